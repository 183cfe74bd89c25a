"""Why is the `fp4` linear (NVFP4 -> bf16 weight, then a bf16 GEMM) slower than the bf16 layer by more than the
dequantization kernel costs? Times, in alternating rounds (CUDA events, median of per-round minima, the order
rotated every round), at M = 32,760 and the Wan shapes:

    bf16        F.linear(x, W, b)                     the bf16 layer (W random bf16, as bench/linear.py)
    bf16_copy   F.linear(x, W.clone(), b)              same values, another allocation (address/alignment effects)
    deq_cached  F.linear(x, Wd, b)                     Wd = the dequantized NVFP4 weight, computed once
    deq_call    F.linear(x, dequantize(), b)           the old layer path: dequantize every call
    layer       layer(x)                               the layer's forward as it is now (unit dequant + alpha)
    nobias      F.linear(x, W) / F.linear(x, Wd)       bias epilogue or not
    unit_cached F.linear(x, Wu, b)                     Wu = E2M1 x E4M3 block scale only (global scale 1): exact
                                                       in bf16, few mantissa bits
    unit_alpha  torch.addmm(b, x, Wu.t(), alpha=g)     the global scale folded into the GEMM's alpha

plus the strides, data_ptr % 256 of each weight, the cuBLAS kernel names (torch profiler) and, while each GEMM runs
alone for ~0.6 s, the SM clock and power that nvidia-smi samples (a data-dependent power cap shows up there).

    python3 bench/fp4_gap.py [--shapes qkvo,ffn_up] [--rounds 15]
"""
import argparse
import datetime
import statistics
import subprocess
import time

import torch
import torch.nn.functional as F

from _common import cuda_time, import_pack, write_result

SHAPES = {"qkvo": (5120, 5120), "ffn_up": (5120, 13824), "ffn_down": (13824, 5120)}


def alternating(fns: dict, rounds: int, repeats: int = 3) -> dict:
    times = {name: [] for name in fns}
    names = list(fns)
    for fn in fns.values():
        fn()
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(min(cuda_time(fns[name], warmup=0, repeats=repeats)))
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def kernel_names(fn) -> list[str]:
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sorted({e.key for e in prof.key_averages() if str(e.device_type).endswith("CUDA")})


def sustained(fns: dict, seconds: float = 0.6) -> dict:
    """Each fn back to back for `seconds`; the mean SM clock (MHz) and power (W) nvidia-smi logged meanwhile."""
    try:
        smi = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu",
                                "--format=csv,noheader,nounits", "-lms", "50"], stdout=subprocess.PIPE, text=True)
    except OSError:
        return {}
    time.sleep(0.5)
    windows = {}
    for name, fn in fns.items():
        torch.cuda.synchronize()
        t0 = time.time()
        while time.time() - t0 < seconds:
            for _ in range(8):
                fn()
            torch.cuda.synchronize()
        windows[name] = (t0 + 0.2, time.time())
    time.sleep(0.2)
    smi.terminate()
    samples = []
    for line in smi.communicate()[0].splitlines():
        try:
            ts, clk, pw, temp = [s.strip() for s in line.split(",")]
            t = datetime.datetime.strptime(ts, "%Y/%m/%d %H:%M:%S.%f").timestamp()
            samples.append((t, float(clk), float(pw), float(temp)))
        except ValueError:
            continue
    out = {}
    for name, (a, b) in windows.items():
        s = [x for x in samples if a <= x[0] <= b]
        if s:
            out[name] = {"sm_mhz": statistics.mean(x[1] for x in s), "watts": statistics.mean(x[2] for x in s),
                         "temp_c": max(x[3] for x in s), "samples": len(s)}
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--m", type=int, default=32760)
    args = p.parse_args()
    import_pack()
    from wantalk.wanvideo import quantization as q
    from wantalk.wanvideo.kernels import quant_triton as qt
    from linear import build
    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator(device="cuda").manual_seed(0)
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, M = {args.m}")
    for shape_name in args.shapes.split(","):
        k, n = SHAPES[shape_name]
        w = (torch.randn(n, k, device="cuda", generator=gen) / k ** 0.5).to(torch.bfloat16)
        b = (0.1 * torch.randn(n, device="cuda", generator=gen)).to(torch.bfloat16)
        x = torch.randn(args.m, k, device="cuda", generator=gen).to(torch.bfloat16)
        layer = build(q, "fp4", w, b)
        g = layer.weight_scale_2
        wd = qt.nvfp4_dequantize(layer.weight, layer.weight_scale, g, layer.shape, torch.bfloat16)
        wu = qt.nvfp4_dequantize(layer.weight, layer.weight_scale, torch.ones_like(g), layer.shape, torch.bfloat16)
        gf = float(g)
        w_copy = w.clone()
        fns = {
            "bf16": lambda: F.linear(x, w, b),
            "bf16_copy": lambda: F.linear(x, w_copy, b),
            "deq_cached": lambda: F.linear(x, wd, b),
            "deq_call": lambda: F.linear(x, qt.nvfp4_dequantize(layer.weight, layer.weight_scale, g, layer.shape,
                                                                 torch.bfloat16), b),
            "layer": lambda: layer(x),
            "bf16_nobias": lambda: F.linear(x, w),
            "deq_nobias": lambda: F.linear(x, wd),
            "unit_cached": lambda: F.linear(x, wu, b),
            "unit_alpha": lambda: torch.addmm(b, x, wu.t(), alpha=gf),
        }
        with torch.no_grad():
            ms = alternating(fns, args.rounds)
            info = {name: {"stride": tuple(t.stride()), "ptr_mod_256": t.data_ptr() % 256,
                           "contiguous": t.is_contiguous()}
                    for name, t in (("W", w), ("W_copy", w_copy), ("Wd", wd), ("Wu", wu),
                                    ("layer_dequant", layer.dequantize(torch.bfloat16)))}
            kernels = {name: kernel_names(fns[name]) for name in ("bf16", "deq_cached", "layer", "unit_alpha")}
            power = sustained({"bf16": fns["bf16"], "deq_cached": fns["deq_cached"], "unit_cached": fns["unit_cached"],
                               "bf16_again": fns["bf16"]})
            ref = x[:256].double() @ wd.double().T + b.double()
            err = {name: ((fns[name]()[:256].double() - ref).norm() / ref.norm()).item()
                   for name in ("deq_cached", "unit_alpha", "layer")}
        print(f"\n## {shape_name} {k}x{n}")
        for name, t in ms.items():
            print(f"  {name:12s} {t:7.3f} ms  x bf16 {ms['bf16'] / t:.3f}")
        for name, v in info.items():
            print(f"  {name}: {v}")
        for name, v in kernels.items():
            print(f"  kernels {name}: {v}")
        for name, v in power.items():
            print(f"  sustained {name}: {v}")
        print(f"  rel. err vs float64 product on the dequantized weight: {err}")
        write_result("fp4_gap", {"shape": shape_name, "m": args.m, "k": k, "n": n, "ms": ms, "kernels": kernels,
                                 "power": power, "rel_err_vs_dequant": err})
        del layer, wd, wu, w_copy
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
