"""int8_triton attention: every block-size config, FP8 and FP16 P.V, against cuDNN and SDPA-flash, in one run.

    python bench/sage_int8.py                    # L 32760, H 40, D 128 (Wan 14B 480p, 81 frames)
    python bench/sage_int8.py --tokens 75600 --configs auto --pv fp8

TFLOP/s counts 4 * B * H * Lq * Lk * D. rel. err: against float32 SDPA on 256 sampled query rows; inputs are
randn plus a per-channel offset in K and V as linear outputs have; the last column is the hard case: zero-mean V
(nothing for the FP8 rounding of P and V to hide behind) and x10 outlier channels in Q and K.
"""
import argparse

import torch
import triton

from _common import import_pack, write_result

# (BLOCK_M, BLOCK_N, warps, stages, ROWSUM_MMA, PIPELINE): the kernel's autotune list plus the ablations
CONFIGS = [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=st, ROWSUM_MMA=r, PIPELINE=pl)
           for m, n, w, st, r, pl in ((64, 128, 4, 3, True, True), (64, 128, 4, 3, True, False),
                                      (64, 128, 4, 3, False, True), (64, 128, 4, 3, False, False),
                                      (64, 128, 4, 2, True, True), (64, 128, 4, 2, True, False),
                                      (64, 64, 4, 3, False, False), (128, 128, 8, 3, True, False),
                                      # candidates beyond the autotune list (issue 16: >= 870 TFLOP/s on the H200)
                                      (128, 128, 8, 2, True, True), (128, 128, 8, 3, True, True),
                                      (64, 64, 4, 3, True, True), (64, 64, 4, 4, True, True))]

# the warp-specialized sm90 schedule (wanvideo/kernels/sage_int8_ws.py): stages of two 128-key blocks in flight
WS_VARIANTS = [dict(stages=st) for st in (2, 3)]


def sdpa(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run(q, k, v):
        with sdpa_kernel(getattr(SDPBackend, backend)):
            return torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    return run


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=32760)
    p.add_argument("--keys", type=int, default=None)
    p.add_argument("--heads", type=int, default=40)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--configs", choices=("all", "auto", "pipelined", "ws"), default="all",
                   help="pipelined: only the configs that issue the next Q.K early; ws: the autotuned Triton kernel "
                        "against the warp-specialized sm90 schedule (sage_int8_ws) in its variants")
    p.add_argument("--pv", default="fp8,fp16", help="P.V precisions to time")
    p.add_argument("--no-rotate", action="store_true", help="quantize Q and K without the Hadamard rotation")
    args = p.parse_args()
    import_pack()
    from wantalk.wanvideo.kernels import sage_int8
    b, lq, h, d = 1, args.tokens, args.heads, args.head_dim
    lk = args.keys or lq
    g = torch.Generator(device="cuda").manual_seed(0)
    make = lambda n, off: (torch.randn(b, n, h * d, device="cuda", generator=g) + off).bfloat16().view(b, n, h, d)
    q = make(lq, 0.0)
    k = make(lk, torch.randn(h * d, device="cuda", generator=g))
    v = make(lk, 0.5 * torch.randn(h * d, device="cuda", generator=g))
    rows = torch.randperm(lq, device="cuda", generator=g)[:256]
    ref = sdpa("MATH")(q[:, rows].float(), k.float(), v.float())
    # zero-mean V (no offset to hide behind) and outlier channels in Q and K: the hard accuracy case
    hard = [torch.randn(1, 4096, 8, d, device="cuda", generator=g) for _ in range(3)]
    hard[0][..., :4] *= 10
    hard[1][..., -4:] *= 10
    hard = [t.bfloat16() for t in hard]
    hard_ref = sdpa("MATH")(*(t.float() for t in hard))
    flops = 4 * b * h * lq * lk * d
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"B {b} Lq {lq} Lk {lk} H {h} D {d}")
    print("| kernel | config | TFLOP/s | ms | rel. err | rel. err, zero-mean V + Q/K outliers |")
    print("|---|---|---|---|---|---|")

    def report(name, config, fn):
        try:
            out = fn(q, k, v)
            err = ((out[:, rows].float() - ref).norm() / ref.norm()).item()
            hard_err = ((fn(*hard).float() - hard_ref).norm() / hard_ref.norm()).item()
            fn = lambda f=fn: f(q, k, v)
            ms = triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median")
        except Exception as e:   # a config that fails to compile is a result, not a crash
            print(f"| {name} | {config} | failed: {type(e).__name__}: {str(e)[:120]} | | |")
            return
        print(f"| {name} | {config} | {flops / ms / 1e9:.0f} | {ms:.3f} | {err:.4f} | {hard_err:.4f} |", flush=True)
        write_result("sage_int8", dict(kernel=name, config=config, tokens=lq, keys=lk, heads=h, head_dim=d,
                                       tflops=round(flops / ms / 1e9, 1), ms=round(ms, 4), rel_err=round(err, 5),
                                       hard_rel_err=round(hard_err, 5),
                                       device=torch.cuda.get_device_name(), torch=torch.__version__))

    for backend in ("CUDNN_ATTENTION", "FLASH_ATTENTION"):
        report(backend, "-", sdpa(backend))
    if args.configs == "ws":
        from wantalk.wanvideo.kernels import sage_int8_ws

        def ws(variant):
            def run(q_, k_, v_):
                out = torch.empty_like(q_)
                quantized = sage_int8.quantize_qkv(q_, k_, v_, q_.shape[-1] ** -0.5, torch.float8_e4m3fn,
                                                   mma_key_order=True)
                sage_int8_ws.attend_quantized_ws(quantized, out, k_.shape[1], k_.shape[2], **variant)
                return out
            return run
        report("int8_triton fp8 PV", "autotuned", lambda *t: sage_int8.sage_int8_attention(*t))
        for variant in WS_VARIANTS:
            report("int8 ws sm90", variant, ws(variant))
        report("int8_triton fp8 PV", "autotuned (again)", lambda *t: sage_int8.sage_int8_attention(*t))
        return
    for pv_fp8 in [name == "fp8" for name in args.pv.split(",")]:
        name = "int8_triton " + ("fp8 PV" if pv_fp8 else "fp16 PV")
        chosen = {"all": CONFIGS, "auto": [None], "pipelined": [c for c in CONFIGS if c["PIPELINE"]]}[args.configs]
        for config in chosen:
            report(name, config or "autotuned",
                   lambda *t, c=config, f=pv_fp8: sage_int8.sage_int8_attention(
                       *t, pv_fp8=f, config=c, rotate=not args.no_rotate))
    bench = lambda fn: triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
    ms = bench(lambda: sage_int8.quantize_qkv(q, k, v, d ** -0.5, torch.float8_e4m3fn))
    lqp = sage_int8._padded(lq)
    q8 = torch.empty(b * h, lqp, d, dtype=torch.int8, device="cuda")
    qs = torch.empty(b * h, lqp, dtype=torch.float32, device="cuda")
    vt = torch.empty(b * h, d, lqp, dtype=torch.float8_e4m3fn, device="cuda")
    vs = torch.empty(b * h, lqp // sage_int8.KBLK, dtype=torch.float32, device="cuda")
    mean = sage_int8.smoothing_mean(v)
    parts = {"smoothing mean": bench(lambda: sage_int8.smoothing_mean(k)),
             "Q": bench(lambda: sage_int8._quantize(q, q8, qs, qs, 0, 64, 0.1, True)),
             "V": bench(lambda: sage_int8._quantize(v, vt, vs, mean, 2, sage_int8.KBLK)),
             "bf16 copy of Q": bench(lambda: q.clone())}
    print(f"quantization alone: {ms:.3f} ms; parts (ms): " + ", ".join(f"{n} {t:.3f}" for n, t in parts.items()))


if __name__ == "__main__":
    main()
