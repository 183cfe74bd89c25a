"""Whole linear layer (activation quantization included) of every quantization mode next to bf16, at Wan shapes.

M = 32,760 tokens (81 frames at 480x832); (K, N) = q/k/v/o 5120x5120, ffn up 5120x13824, ffn down 13824x5120.
TFLOP/s = 2*M*K*N / time; ratio = bf16 time / mode time, both timed in alternating rounds (median of the
rounds' minima) so that clock and temperature drift during the run hit both alike; weight bytes include scales;
rel. err is against the float64 product of the bf16 weights on 256 sampled rows. Each timed sample is `--calls`
back-to-back calls of the layer, as a forward pass issues them (the GPU queue stays full, so a path's Python and
launch cost counts only where it exceeds its GPU time); times are per call. `fast` rows also split the
time into the activation quantization, the weight conversion (fp4 -> fp8) and the GEMM; fp4 rows into the weight
dequantization and the GEMM (bench/nvfp4_dequant.py times the dequantization kernels alone).

    python bench/linear.py            # full shapes
    python bench/linear.py --quick    # M = 8190, fewer repeats
    python bench/linear.py --modes none --gguf Q8_0,Q4_K   # GGUF layers (blocks dequantized per call)

GGUF rows: Q8_0 blocks quantize the bf16 weights (rel. err against their float64 product, as the modes); other
types hold random blocks (bench/gguf_weights.py), so their rel. err is against the float64 product of the layer's
own dequantized weights; weight bytes are the blocks, exactly what the GGUF file holds for that tensor.
"""
import argparse
import statistics

import torch
import torch.nn as nn
import torch.nn.functional as F

from _common import cuda_time, import_pack, write_result

SHAPES = {"qkvo": (5120, 5120), "ffn_up": (5120, 13824), "ffn_down": (13824, 5120)}


def build(q, mode, w, b):
    model = nn.Sequential(nn.Linear(w.shape[1], w.shape[0], device="meta", dtype=torch.bfloat16))
    q.apply_policy(model, mode, (), base_dtype=torch.bfloat16)
    q.load_param(model, "0.weight", w, device="cuda", base_dtype=torch.bfloat16)
    q.load_param(model, "0.bias", b, device="cuda", base_dtype=torch.bfloat16)
    return model[0]


def build_gguf(qtype, w, b, gen):
    from gguf_weights import blocks_for
    from wantalk.fp8_optimization import GGUFLinear
    layer = GGUFLinear(w.shape[1], w.shape[0], qtype=qtype, device="cuda")
    layer.set_codes(blocks_for(w, qtype, gen))
    layer.bias = nn.Parameter(b.clone(), requires_grad=False)
    return layer


def back_to_back(fn, calls):
    """One sample = `calls` consecutive calls; cuda_time of it divided by `calls` is seconds per call."""
    def run():
        for _ in range(calls):
            fn()
    return run


def paired(base_fn, mode_fn, rounds, repeats):
    """Seconds of the bf16 layer and of a mode, each the median over alternating rounds of a per-round minimum."""
    base, mode = [], []
    for _ in range(rounds):
        base.append(min(cuda_time(base_fn, warmup=1, repeats=repeats)))
        mode.append(min(cuda_time(mode_fn, warmup=1, repeats=repeats)))
    return statistics.median(base), statistics.median(mode)


def _ms(fn, calls=4):
    return 1000 * min(cuda_time(back_to_back(fn, calls), warmup=2, repeats=5)) / calls


def parts(layer, x2):
    """Milliseconds of the fast path's pieces (activation quantization, fp8 weight form, GEMM), or of the
    dequantizing path's (weight to bf16, the bf16 GEMM on it)."""
    from wantalk import fp8_optimization
    from wantalk.wanvideo.kernels import quant_triton as qt
    if not layer.fast:
        w = layer.dequantize(torch.bfloat16)
        return {"weight_bf16_ms": _ms(lambda: layer.dequantize(torch.bfloat16)),
                "gemm_ms": _ms(lambda: F.linear(x2, w, layer.bias))}
    xq, xs = qt.quantize_rows(x2)
    w8, ws = layer.fp8_operands()
    return {"act_quant_ms": _ms(lambda: qt.quantize_rows(x2)), "weight_fp8_ms": _ms(layer.fp8_operands),
            "gemm_ms": _ms(lambda: torch._scaled_mm(xq, w8.t(), scale_a=xs, scale_b=ws.reshape(1, -1),
                                                    bias=layer.bias, out_dtype=torch.bfloat16,
                                                    use_fast_accum=fp8_optimization.USE_FAST_ACCUM))}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--m", type=int, default=None)
    p.add_argument("--modes", default=None, help="comma-separated subset of quantization modes ('none': no mode)")
    p.add_argument("--gguf", default="", help="comma-separated GGUF block types to time as well (e.g. Q8_0,Q4_K)")
    p.add_argument("--calls", type=int, default=4, help="back-to-back layer calls per timed sample")
    p.add_argument("--exact-accum", action="store_true", help="FP8 GEMMs without Hopper's fast accumulation")
    args = p.parse_args()
    import_pack()
    from wantalk import fp8_optimization
    fp8_optimization.USE_FAST_ACCUM = not args.exact_accum
    from wantalk.wanvideo import quantization as q
    torch.backends.cuda.matmul.allow_tf32 = False
    m = args.m or (8190 if args.quick else 32760)
    rounds, repeats = (3, 2) if args.quick else (7, 3)
    modes = args.modes.split(",") if args.modes else [x for x in q.QUANTIZATION_MODES if x != "disabled"]
    modes = [x for x in modes if x != "none"] + [f"gguf_{t}" for t in args.gguf.split(",") if t]
    gen = torch.Generator(device="cuda").manual_seed(0)
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, M = {m}, "
          f"fast accumulation {fp8_optimization.USE_FAST_ACCUM}, {args.calls} back-to-back calls per sample")
    print("| shape | mode | ms | TFLOP/s | x bf16 | weight MiB | x bf16 bytes | rel. err |")
    print("|---|---|---|---|---|---|---|---|")
    for shape_name, (k, n) in SHAPES.items():
        w = (torch.randn(n, k, device="cuda", generator=gen) / k ** 0.5).to(torch.bfloat16)
        b = (0.1 * torch.randn(n, device="cuda", generator=gen)).to(torch.bfloat16)
        x = torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16)
        rows = torch.randperm(m, device="cuda", generator=gen)[:256]
        ref = x[rows].double() @ w.double().T + b.double()
        flops = 2 * m * k * n
        dense = nn.Linear(k, n, device="cuda", dtype=torch.bfloat16)
        dense.weight.data.copy_(w)
        dense.bias.data.copy_(b)
        with torch.no_grad():
            base_s = min(cuda_time(back_to_back(lambda: dense(x), args.calls), warmup=2,
                                   repeats=rounds * repeats)) / args.calls
        dense_bytes = n * k * 2
        print(f"| {shape_name} {k}x{n} | bf16 | {1000 * base_s:.3f} | {flops / base_s / 1e12:.0f} | 1.00 | "
              f"{dense_bytes / 2**20:.1f} | 1.00 | - |")
        for mode in modes:
            layer = build_gguf(mode[5:], w, b, gen) if mode.startswith("gguf_") else build(q, mode, w, b)
            own = mode.startswith("gguf_") and mode != "gguf_Q8_0"  # random blocks: exactness of the path
            mode_ref = x[rows].double() @ layer.dequantize(torch.float32).double().T + b.double() if own else ref
            with torch.no_grad():
                pair_base_s, s = (t / args.calls for t in paired(back_to_back(lambda: dense(x), args.calls),
                                                                  back_to_back(lambda: layer(x), args.calls),
                                                                  rounds, repeats))
                out = layer(x[rows])
            err = ((out.double() - mode_ref).norm() / mode_ref.norm()).item()
            wb = layer.weight_bytes()
            result = {"bench": "linear", "shape": shape_name, "m": m, "k": k, "n": n, "mode": mode,
                      "ms": 1000 * s, "tflops": flops / s / 1e12, "speedup": pair_base_s / s, "weight_bytes": wb,
                      "bytes_ratio": wb / dense_bytes, "rel_err": err, "bf16_ms": 1000 * pair_base_s,
                      "fast_accum": fp8_optimization.USE_FAST_ACCUM,
                      "calls_per_sample": args.calls}
            if layer.fast or mode.startswith("fp4"):
                result.update(parts(layer, x))
            print(f"| {shape_name} {k}x{n} | {mode} | {1000 * s:.3f} | {flops / s / 1e12:.0f} | "
                  f"{pair_base_s / s:.2f} | {wb / 2**20:.1f} | {wb / dense_bytes:.3f} | {100 * err:.2f}% |")
            write_result("linear", result)
            del layer
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
