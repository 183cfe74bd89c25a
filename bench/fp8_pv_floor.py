"""The error floor of ANY attention kernel that rounds P and V to FP8 E4M3, measured in float64 on the CPU.

Exact float64 softmax(q k^T / sqrt(D)); then only P (scaled to [0, 448] per row, as int8_triton does) and V (minus
its mean, one scale per 128 keys) are rounded to e4m3 and the normalised P.V is taken in float64 again. Nothing
else is quantized, so the result is a lower bound for every FP8 P.V kernel (int8_triton, SageAttention2), whatever
its Q.K precision or accumulation. Inputs: randn q, k, v (zero-mean V: the error has nothing to hide behind),
and the same with a per-channel offset in V as linear layers with a bias produce.

    python bench/fp8_pv_floor.py [--keys 4096] [--heads 4]
"""
import argparse

import torch


def e4m3(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float8_e4m3fn).to(torch.float64)


def floor_error(q, k, v, block: int = 128) -> tuple[float, float, float]:
    """Relative error of the output when (P only, V only, both) are rounded to e4m3."""
    d = q.shape[-1]
    p = torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5, dim=-1)
    ref = p @ v
    p8 = e4m3(p / p.amax(-1, keepdim=True) * 448)
    mean = v.mean(-2, keepdim=True)
    vc = v - mean
    blocks = vc.unflatten(-2, (-1, block))
    scale = blocks.abs().amax((-1, -2), keepdim=True).clamp_min(1e-12) / 448
    v8 = (e4m3(blocks / scale) * scale).flatten(-3, -2) + mean
    rel = lambda out: ((out - ref).norm() / ref.norm()).item()
    return (rel((p8 @ v) / p8.sum(-1, keepdim=True)), rel(p @ v8), rel((p8 @ v8) / p8.sum(-1, keepdim=True)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--keys", type=int, default=4096)
    ap.add_argument("--queries", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    shape = lambda n: (args.heads, n, args.head_dim)
    q, k, v = (torch.randn(shape(n), generator=g, dtype=torch.float64) for n in (args.queries, args.keys, args.keys))
    offset = 0.5 * torch.randn(args.heads, 1, args.head_dim, generator=g, dtype=torch.float64)
    print(f"float64 on CPU, torch {torch.__version__}, {args.heads} heads x {args.queries} queries x {args.keys} keys, "
          f"D {args.head_dim}")
    print("| V | P to e4m3 only | V to e4m3 only | both |")
    print("|---|---|---|---|")
    for name, values in (("randn (zero mean)", v), ("randn + 0.5 randn per-channel offset", v + offset)):
        errors = floor_error(q, k, values)
        print(f"| {name} | " + " | ".join(f"{100 * e:.2f}%" for e in errors) + " |")


if __name__ == "__main__":
    main()
