"""Attention throughput of every mode at Wan shapes, side by side with SDPA-flash, in one run.

Inputs are made the way the model makes them (views of linear outputs, [B, L, H, D], bf16), so the numbers
include the dispatcher's own work. TFLOP/s = 4 * B * H * Lq * Lk * D / time. Calls are timed back to back in
batches of at least 2 ms, as a model queues them: one call per event pair measured launch jitter as much as the
kernel (odd_4099_77, one kernel behind two modes: 39 to 71 TFLOP/s between repeats). `auto_over_raw_kernel`
compares `auto` with the kernel it picked called directly (no dispatch): the dispatcher's CPU cost where the
kernel is shorter than it. The relative error is measured against float32 SDPA on 256 sampled query rows.

    python bench/attention.py            # full Wan shapes (81 frames 480x832 = 32,760 tokens)
    python bench/attention.py --quick    # smaller shapes, fewer repeats
    python bench/attention.py --layout hnd   # q, k, v stored [B, H, L, D] instead of [B, L, H, D]
    python bench/attention.py --shapes crossover --modes auto,sdpa_cudnn,flash_attn_4   # where FA4 overtakes cuDNN

Modes served by a kernel already timed for the shape reuse its numbers (a mode whose package is absent falls back
to the same kernel). `first call ms` is the first call of a mode at a shape, synchronized: FlashAttention-4's JIT
compile shows there once per process and family. `host us` is the host time of issuing one call (30 calls issued
back to back, then one synchronize): where it exceeds the kernel's time the GPU waits on Python.
"""
import argparse
import math
import time

import torch

from _common import cuda_time, import_pack, write_result

SHAPES = {   # name: (batch, query tokens, key tokens, heads, head dim)
    "self_32760": (1, 32760, 32760, 40, 128),
    "text_cross_512": (1, 32760, 512, 40, 128),
    "clip_cross_257": (1, 32760, 257, 40, 128),
    "audio_21x1560_32": (21, 1560, 32, 40, 128),
    "odd_4099_77": (2, 4099, 77, 40, 128),
}
CROSSOVER_SHAPES = {   # FA4 against cuDNN around auto_from_kv_len: self-attention and 32760-query cross-attention
    **{f"self_{n}": (1, n, n, 40, 128) for n in (1024, 2048, 4096, 8190)},
    **{f"cross_32760x{n}": (1, 32760, n, 40, 128) for n in (1024, 2048, 4096)},
}
QUICK_SHAPES = {
    "self_8190": (1, 8190, 8190, 40, 128),
    "clip_cross_257": (1, 8190, 257, 40, 128),
    "audio_21x1560_32": (21, 1560, 32, 40, 128),
}


def fp32_rows_reference(q, k, v, rows):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    torch.backends.cuda.matmul.allow_tf32 = False
    with sdpa_kernel(SDPBackend.MATH):
        out = torch.nn.functional.scaled_dot_product_attention(
            q[:, rows].float().transpose(1, 2), k.float().transpose(1, 2), v.float().transpose(1, 2))
    return out.transpose(1, 2)


def seconds_per_call(fn, repeats: int) -> float:
    """Median seconds per call over `repeats` back-to-back batches of at least 2 ms each."""
    batch = max(1, math.ceil(2e-3 / min(cuda_time(fn, warmup=2, repeats=3))))
    times = sorted(cuda_time(lambda: [fn() for _ in range(batch)], warmup=1, repeats=repeats))
    return times[len(times) // 2] / batch


def host_us_per_call(fn, calls: int = 30) -> float:
    """Host time of issuing one call: `calls` calls back to back, timed before the synchronize."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - start) / calls * 1e6
    torch.cuda.synchronize()
    return host


def raw_kernel(kernel, q, k, v):
    """The kernel's adapter on views in its own layout, without the dispatcher (None where views don't comply)."""
    views = [t.transpose(1, 2) if kernel.contract.layout == "HND" else t for t in (q, k, v)]
    if any(kernel.contract.layout_violation(t) is not None for t in views) or kernel.contract.clobbers_k:
        return None
    scale = q.shape[-1] ** -0.5
    return lambda: kernel.run(*views, scale=scale, mask=None)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--layout", choices=("nhd", "hnd"), default="nhd", help="storage order of q, k, v")
    p.add_argument("--shapes", choices=("wan", "crossover"), default="wan")
    p.add_argument("--modes", default=None, help="comma-separated modes (default: all)")
    args = p.parse_args()
    pack = import_pack()
    from wantalk.wanvideo.modules.attention import ATTENTION_MODES, attention, select_kernel
    from wantalk.wanvideo.modules.attention_kernels import CONTRACTS, KERNELS

    shapes = QUICK_SHAPES if args.quick else CROSSOVER_SHAPES if args.shapes == "crossover" else SHAPES
    modes = args.modes.split(",") if args.modes else ATTENTION_MODES
    repeats = args.repeats or (3 if args.quick else 10)
    device = torch.cuda.get_device_name()
    print(f"# {device}, torch {torch.__version__}, {pack.__name__} attention modes, bf16, {args.layout} storage, "
          f"median of {repeats} timed batches (>= 2 ms each)")
    summary = []
    for shape_name, (b, lq, lk, h, d) in shapes.items():
        g = torch.Generator(device="cuda").manual_seed(0)
        if args.layout == "nhd":   # views of linear outputs, as the model passes them
            q, k, v = (torch.randn(b, n, h * d, device="cuda", dtype=torch.bfloat16, generator=g).view(b, n, h, d)
                       for n in (lq, lk, lk))
        else:                      # [B, H, L, D] storage (the layout measured in docs/NOTES.md §5.2)
            q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
                       for n in (lq, lk, lk))
        rows = torch.randperm(lq, device="cuda", generator=g)[:256]
        ref = fp32_rows_reference(q, k, v, rows)
        flops = 4 * b * h * lq * lk * d
        results = {}
        print(f"\n## {shape_name}: B {b}, Lq {lq}, Lk {lk}, H {h}, D {d}")
        print("| mode | served by | TFLOP/s | x sdpa_flash | rel. err | first call ms | host us |")
        print("|---|---|---|---|---|---|---|")
        timed = {}   # kernel -> (tflops, err, host us) of the first mode it served at this shape
        first_ms = {}
        for mode in modes:
            kernel = select_kernel(q, k, v, policy=mode)
            if kernel == "sdpa_math" and b * h * lq * lk * 4 > 16e9:
                continue
            torch.cuda.synchronize()
            start = time.perf_counter()
            out = attention(q, k, v, policy=mode)
            torch.cuda.synchronize()
            first_ms[mode] = (time.perf_counter() - start) * 1e3
            if kernel not in timed:
                err = ((out[:, rows].float() - ref).norm() / ref.norm()).item()
                tflops = flops / seconds_per_call(lambda: attention(q, k, v, policy=mode), repeats) / 1e12
                timed[kernel] = (tflops, err, host_us_per_call(lambda: attention(q, k, v, policy=mode)))
            results[mode] = (kernel, *timed[kernel])
        flash = results.get("sdpa_flash", (None, float("nan")))[1]
        for mode, (kernel, tflops, err, host) in results.items():
            print(f"| {mode} | {kernel} | {tflops:.0f} | {tflops / flash:.2f} | {err:.4f} | {first_ms[mode]:.1f} "
                  f"| {host:.0f} |")
        exact = {m: r for m, r in results.items() if CONTRACTS[r[0]].exact}
        best_exact = max(exact.items(), key=lambda item: item[1][1])
        best_any = max(results.items(), key=lambda item: item[1][1])
        auto = results["auto"][1]
        raw_fn = raw_kernel(KERNELS[results["auto"][0]], q, k, v)
        raw = None if raw_fn is None else flops / seconds_per_call(raw_fn, repeats) / 1e12
        raw_host = None if raw_fn is None else host_us_per_call(raw_fn)
        line = dict(shape=shape_name, layout=args.layout, device=device, torch=torch.__version__,
                    auto_kernel=results["auto"][0], auto_tflops=round(auto, 1), sdpa_flash_tflops=round(flash, 1),
                    auto_over_sdpa_flash=round(auto / flash, 3),
                    best_exact=best_exact[0], auto_over_best_exact=round(auto / best_exact[1][1], 3),
                    best_any=best_any[0], best_any_err=round(best_any[1][2], 4),
                    auto_over_best_any=round(auto / best_any[1][1], 3),
                    raw_kernel_tflops=None if raw is None else round(raw, 1),
                    auto_over_raw_kernel=None if raw is None else round(auto / raw, 3),
                    auto_host_us=round(results["auto"][3], 1),
                    raw_kernel_host_us=None if raw_host is None else round(raw_host, 1),
                    modes={m: dict(kernel=r[0], tflops=round(r[1], 1), rel_err=round(r[2], 5),
                                   first_call_ms=round(first_ms[m], 1), host_us=round(r[3], 1))
                           for m, r in results.items()})
        summary.append(line)
        write_result("attention", line)
        del q, k, v, ref
        torch.cuda.empty_cache()
    print("\n| shape | auto kernel | auto TFLOP/s | auto / sdpa_flash | auto / best exact | best any (err) "
          "| auto / raw kernel | host us auto / raw |")
    print("|---|---|---|---|---|---|---|---|")
    for s in summary:
        print(f"| {s['shape']} | {s['auto_kernel']} | {s['auto_tflops']} | {s['auto_over_sdpa_flash']} | "
              f"{s['auto_over_best_exact']} ({s['best_exact']}) | {s['best_any']} "
              f"x{s['auto_over_best_any']} ({s['best_any_err']}) | {s['auto_over_raw_kernel']} | "
              f"{s['auto_host_us']} / {s['raw_kernel_host_us']} |")


if __name__ == "__main__":
    main()
