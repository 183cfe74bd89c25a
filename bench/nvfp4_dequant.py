"""NVFP4 weight dequantization kernels against the memory floor: bytes moved, achieved GB/s, share of a measured
device-to-device copy. `triton.testing.do_bench` clears L2 before every call, as the GEMM between two
dequantizations does in a model.

    python bench/nvfp4_dequant.py                        # the kernels in the pack
    python bench/nvfp4_dequant.py --before old_kernels.py   # also an older quant_triton.py, for comparison
"""
import argparse
import importlib.util
import sys

import torch

from _common import import_pack, write_result

SHAPES = {"qkvo": (5120, 5120), "ffn_up": (13824, 5120), "ffn_down": (5120, 13824)}  # weight [N, K]
CONFIGS = [(4, 128, 4), (8, 128, 4), (16, 64, 4), (8, 64, 2), (4, 256, 8), (16, 128, 8)]


def median_ms(fn):
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth() -> float:
    """Bytes read plus written per second of a 1 GiB device-to-device copy: the ceiling to compare with."""
    src = torch.empty(1 << 29, device="cuda", dtype=torch.int16).random_()
    dst = torch.empty_like(src)
    return 2 * src.numel() * 2 / (median_ms(lambda: dst.copy_(src)) / 1000)


def load_before(path):
    """An older copy of quant_triton.py as a sibling module (its relative imports resolve in the pack)."""
    name = "wantalk.wanvideo.kernels._quant_triton_before"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def variants(qt, before):
    """name -> fn(packed, scales, g, shape) for the bf16 and the E4M3 forms."""
    from wantalk.wanvideo.kernels import quant_formats as qf
    out = {"bf16": lambda p, s, g, shape: qt.nvfp4_dequantize(p, s, g, shape, torch.bfloat16),
           "e4m3+row scale": qt.nvfp4_to_fp8}
    if before is not None:
        out["bf16 before"] = lambda p, s, g, shape: before.nvfp4_dequantize(p, s, g, shape, torch.bfloat16)
        out["e4m3+row scale before"] = lambda p, s, g, shape: before.nvfp4_dequantize(
            p, s, g, shape, torch.float8_e4m3fn, qf.nvfp4_row_scale(s, g, shape[0]))
    return out


def sweep(qt, weight, shape):
    """ms of each launch configuration (rows per program, packed words per step, warps), bf16 and E4M3 forms."""
    default = qt.ROWS_PER_PROGRAM, qt.WORDS_PER_STEP, qt.WARPS
    out = {}
    for config in CONFIGS:
        qt.ROWS_PER_PROGRAM, qt.WORDS_PER_STEP, qt.WARPS = config
        out[config] = (median_ms(lambda: qt.nvfp4_dequantize(*weight, shape, torch.bfloat16)),
                       median_ms(lambda: qt.nvfp4_to_fp8(*weight, shape)))
    qt.ROWS_PER_PROGRAM, qt.WORDS_PER_STEP, qt.WARPS = default
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--before", default=None, help="path of an older quant_triton.py to time next to the current one")
    p.add_argument("--sweep", action="store_true", help="also time other launch configurations")
    args = p.parse_args()
    import_pack()
    from wantalk.wanvideo.kernels import quant_formats as qf
    from wantalk.wanvideo.kernels import quant_triton as qt
    before = load_before(args.before) if args.before else None
    ceiling = copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, copy {ceiling / 1e9:.0f} GB/s")
    rows, swept = [], []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for shape_name, (n, k) in SHAPES.items():
        weight = qf.nvfp4_quantize(torch.randn(n, k, device="cuda", generator=gen) / k ** 0.5)
        in_bytes = sum(t.numel() * t.element_size() for t in weight[:2])
        for name, fn in variants(qt, before).items():
            ms = median_ms(lambda: fn(*weight, (n, k)))
            out = fn(*weight, (n, k))
            out_bytes = sum(t.numel() * t.element_size() for t in (out if isinstance(out, tuple) else (out,)))
            gbs = (in_bytes + out_bytes) / (ms / 1000) / 1e9
            rows.append((f"{shape_name} {n}x{k}", name, ms, (in_bytes + out_bytes) / 1e6, gbs, gbs * 1e9 / ceiling))
            write_result("nvfp4_dequant", {"shape": shape_name, "n": n, "k": k, "variant": name, "ms": ms,
                                           "bytes": in_bytes + out_bytes, "gb_s": gbs, "of_copy": gbs * 1e9 / ceiling})
        if args.sweep:
            for config, (bf16_ms, fp8_ms) in sweep(qt, weight, (n, k)).items():
                swept.append((f"{shape_name} {n}x{k}", config, bf16_ms, fp8_ms))
                write_result("nvfp4_dequant", {"shape": shape_name, "config": config, "bf16_ms": bf16_ms,
                                               "e4m3_ms": fp8_ms})
    if swept:
        print("| weight [N, K] | rows/program, words/step, warps | bf16 ms | e4m3 ms |")
        print("|---|---|---|---|")
        for r in swept:
            print(f"| {r[0]} | {r[1]} | {r[2]:.4f} | {r[3]:.4f} |")
    print("| weight [N, K] | output | ms | MB moved | GB/s | of copy |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.4f} | {r[3]:.1f} | {r[4]:.0f} | {100 * r[5]:.0f}% |")


if __name__ == "__main__":
    main()
