"""The Wan block's elementwise stages on the GPU, unfused (each stage its own pass, as before issue 16) against
fused (`fused_ops`): median time of each, achieved bandwidth of the fused kernel, and whether the fused result
is bit for bit the unfused one; indented rows time other launch settings of the row above (register caps, GELU
steps). Also the cuBLASLt GELU epilogue (`torch._addmm_activation`) for the bf16 FFN, which rounds differently
(GELU before the bf16 rounding): its time and error are shown, not its identity. Last, one whole block with fast
FP8 linears, fused against unfused: identity, alternated timings, the kernels whose time differs.

    python bench/block_stages.py                       # 480x832x81: 32,760 tokens, dim 5120, FFN 13824
    python bench/block_stages.py --tokens 8190 --block-tokens 2048
"""
import argparse

import torch
import torch.nn.functional as F

from _common import import_pack

import_pack()
from triton.testing import do_bench  # noqa: E402

from wantalk import fp8_optimization as fp8  # noqa: E402
from wantalk.wanvideo.kernels.quant_triton import quantize_rows  # noqa: E402
from wantalk.wanvideo.modules import fused_ops as fo  # noqa: E402
from wantalk.wanvideo.modules import model as wan  # noqa: E402

DEV = "cuda"
BF16 = torch.bfloat16


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()])


def mismatch(a, b) -> float:
    """The largest fraction of elements whose bits differ, over the tensors of a result (FP8Rows, tuples); 0 is
    bit-identical."""
    if isinstance(a, fp8.FP8Rows):
        return mismatch((a.codes.reshape(-1, a.shape[-1]), a.scales), b)
    if isinstance(a, (tuple, list)):
        return max(mismatch(x, y) for x, y in zip(a, b, strict=True))
    if a.shape != b.shape:
        return 1.0
    return (bits(a.contiguous()) != bits(b.contiguous())).float().mean().item()


def identity(a, b) -> str:
    frac = mismatch(a, b)
    return "True" if frac == 0 else f"False ({frac:.2e} of elements differ)"


def ms(fn, **kw) -> float:
    return do_bench(fn, return_mode="median", **kw)


def stream(tokens: int, dim: int, gen) -> dict:
    """Realistic block inputs: a float32 residual stream with per-channel offsets, bf16 branch outputs,
    modulation vectors near their trained scale, LayerNorm affine near 1."""
    r = lambda *s: torch.randn(*s, device=DEV, generator=gen)
    return {"x": r(1, tokens, dim) * 2 + r(dim) * 3, "y": (r(1, tokens, dim) + r(dim)).to(BF16),
            "y2": (0.7 * r(1, tokens, dim)).to(BF16),
            "gate": r(1, dim) * 0.2, "scale": r(1, dim) * 0.2, "shift": r(1, dim) * 0.2,
            "w": (1 + 0.1 * r(dim)).to(BF16), "b": (0.1 * r(dim)).to(BF16)}


def patched(module, values: dict, fn):
    """`fn` run with the attributes `values` of `module` set (launch settings, unfused stand-ins)."""
    def run():
        saved = {name: getattr(module, name) for name in values}
        for name, value in values.items():
            setattr(module, name, value)
        try:
            return fn()
        finally:
            for name, value in saved.items():
                setattr(module, name, value)
    return run


def with_setting(name: str, value, fn):
    """`fn` run with the fused_ops launch setting `name` (NORM_MAX_REGISTERS, GELU_STEP) set to `value`."""
    return patched(fo, {name: value}, fn)


def caps(registers):
    """NORM_MAX_REGISTERS with one cap for both LayerNorm kernels (None: uncapped)."""
    return {"plain": registers, "residual": registers}


def stage_cases(s: dict, hidden: torch.Tensor) -> list:
    """(name, unfused, fused, bytes the fused pass moves) per stage; unfused = the pre-issue-16 sequence."""
    x, y, y2, gate, scale, shift, w, b = (s[k] for k in ("x", "y", "y2", "gate", "scale", "shift", "w", "b"))
    n, c = x.shape[1], x.shape[2]
    rows = lambda t: quantize_rows(t.reshape(-1, t.shape[-1]))
    ln_mod = lambda t, **kw: fo.layer_norm_modulate(t, 1e-6, out_dtype=BF16, **kw)
    mod = {"scale": scale, "shift": shift}
    affine = {"weight": w, "bias": b}
    fp8_out = n * c + 4 * n

    def qkv_unfused():
        xn = ln_mod(x, **mod)
        return [rows(xn) for _ in range(3)][0]

    def residual_unfused(gate_, norm, to_fp8):
        x2 = fo.residual_add(x, y, gate_)
        xn = ln_mod(x2, **norm)
        return x2, (rows(xn) if to_fp8 else xn)

    def residual_fused(gate_, norm, to_fp8):
        return fo.residual_layer_norm_modulate(x, y, gate_, 1e-6, out_dtype=BF16, fp8_rows=to_fp8, **norm)

    qkv_fused = lambda: ln_mod(x, fp8_rows=True, **mod)
    chain_fused = lambda: residual_fused(gate, mod, True)
    gelu_fused = lambda: fo.gelu_tanh_fp8_rows(hidden)
    return [
        ("LN-mod -> q,k,v FP8 rows", qkv_unfused, qkv_fused, 4 * n * c + fp8_out),
        *[(f"  same, maxnreg {r}", qkv_unfused, with_setting("NORM_MAX_REGISTERS", caps(r), qkv_fused),
           4 * n * c + fp8_out) for r in (48, 40)],
        ("+gated FFN residual, next LN-mod -> FP8", lambda: residual_unfused(gate, mod, True), chain_fused,
         10 * n * c + fp8_out),
        *[(f"  same, maxnreg {r}", lambda: residual_unfused(gate, mod, True),
           with_setting("NORM_MAX_REGISTERS", caps(r), chain_fused), 10 * n * c + fp8_out) for r in (48,)],
        ("+gated residual, norm3 -> FP8", lambda: residual_unfused(gate, affine, True),
         lambda: residual_fused(gate, affine, True), 10 * n * c + fp8_out),
        ("+residual, FFN LN-mod -> FP8", lambda: residual_unfused(None, mod, True),
         lambda: residual_fused(None, mod, True), 10 * n * c + fp8_out),
        ("+gated residual, norm3 -> bf16", lambda: residual_unfused(gate, affine, False),
         lambda: residual_fused(gate, affine, False), 12 * n * c),
        ("+residual, FFN LN-mod -> bf16", lambda: residual_unfused(None, mod, False),
         lambda: residual_fused(None, mod, False), 12 * n * c),
        ("text + image attention -> cross o FP8", lambda: rows(y + y2), lambda: fo.add_fp8_rows(y, y2),
         5 * n * c + 4 * n),
        ("GELU(tanh) -> ffn[2] FP8 rows", lambda: rows(F.gelu(hidden, approximate="tanh")), gelu_fused,
         3 * hidden.numel() + 4 * hidden.shape[0]),
        *[(f"  same, step {step}", lambda: rows(F.gelu(hidden, approximate="tanh")),
           with_setting("GELU_STEP", step, gelu_fused), 3 * hidden.numel() + 4 * hidden.shape[0])
          for step in (4096, 8192)],
    ]


def gelu_epilogue(tokens: int, dim: int, ffn: int, gen) -> tuple[float, float, float]:
    """(ms of bf16 linear + torch GELU, ms of cuBLASLt's fused GELU epilogue, relative difference of the two)."""
    x = torch.randn(tokens, dim, device=DEV, generator=gen).to(BF16)
    w = (torch.randn(ffn, dim, device=DEV, generator=gen) / dim ** 0.5).to(BF16)
    b = (0.1 * torch.randn(ffn, device=DEV, generator=gen)).to(BF16)
    two_pass = lambda: F.gelu(F.linear(x, w, b), approximate="tanh")
    epilogue = lambda: torch._addmm_activation(b, x, w.t(), use_gelu=True)
    ref, out = two_pass().float(), epilogue().float()
    return ms(two_pass), ms(epilogue), ((out - ref).norm() / ref.norm()).item()


def fp8_block(dim: int, heads: int, ffn: int, gen) -> wan.WanAttentionBlock:
    """A Wan block with random weights whose linears are fast row-wise FP8 layers (as fp8_e4m3fn_scaled_fast)."""
    cfg = wan.WanConfig(dim=dim, ffn_dim=ffn, num_heads=heads, num_layers=1)
    block = wan.WanAttentionBlock(cfg, device=DEV, dtype=BF16, operations=wan.cast_ops)
    for name, linear in list(block.named_modules()):
        if isinstance(linear, torch.nn.Linear):
            layer = fp8.FP8Linear(linear.in_features, linear.out_features, fast=True, device=DEV)
            layer.set_from_float(torch.randn(linear.weight.shape, device=DEV, generator=gen) / dim ** 0.5)
            layer.bias.data.normal_(0, 0.1, generator=gen)
            layer.input_dtype = BF16
            parent, _, leaf = name.rpartition(".")
            setattr(block.get_submodule(parent), leaf, layer)
    return block


def kernel_totals(fn) -> dict:
    """GPU ms per kernel name in one call of `fn` (bench/forward.py's profiler summary)."""
    from forward import profiled
    return {k["name"]: k["total_ms"] for k in profiled(fn, top=60)["top_kernels"]}


def block_comparison(tokens_per_frame: int, frames: int, dim: int, ffn: int, gen) -> None:
    """A whole fp8 block's forward with the fusions against the same block with every stage unfused: identity,
    time (unfused and fused alternated three times: clock drift hits both), and the kernels whose time differs."""
    heads = dim // 128
    block = fp8_block(dim, heads, ffn, gen)
    h, w = 2, tokens_per_frame // 2
    tokens = frames * h * w
    x = torch.randn(1, tokens, dim, device=DEV, generator=gen) * 2
    context = torch.randn(1, 257 + 512, dim, device=DEV, generator=gen).to(BF16)
    e0 = torch.randn(1, 6, dim, device=DEV, generator=gen) * 0.1
    inp = wan.BlockInputs(e0, wan.rope_cos_sin((frames, h, w), dim // heads, DEV), context, (frames, h, w))
    fused = lambda: block(x, inp)
    unfused = patched(wan, {"wants_fp8_rows": lambda *a: False,
                            "residual_layer_norm_modulate": fo.residual_then_layer_norm_modulate}, fused)
    identical = identity(fused(), unfused())
    runs = {"unfused": [], "fused": []}
    for _ in range(3):
        for name, fn in (("unfused", unfused), ("fused", fused)):
            runs[name].append(ms(fn, warmup=50, rep=300))
    print(f"whole fp8 block at {tokens} tokens: fused {' / '.join(f'{t:.2f}' for t in runs['fused'])} ms, unfused "
          f"{' / '.join(f'{t:.2f}' for t in runs['unfused'])} ms, bit-identical output: {identical}")
    new, old = kernel_totals(fused), kernel_totals(unfused)
    print(f"{'kernel (one block, largest differences)':70s} {'unfused ms':>10s} {'fused ms':>9s}")
    for name in sorted(set(new) | set(old), key=lambda k: -abs(new.get(k, 0) - old.get(k, 0)))[:12]:
        print(f"{name[:70]:70s} {old.get(name, 0):10.3f} {new.get(name, 0):9.3f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32760)
    parser.add_argument("--dim", type=int, default=5120)
    parser.add_argument("--ffn", type=int, default=13824)
    parser.add_argument("--block-tokens", type=int, default=32760, help="tokens of the whole-block check (0: skip)")
    args = parser.parse_args()
    gen = torch.Generator(device=DEV)
    gen.seed()
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  tokens {args.tokens}  dim {args.dim}  "
          f"ffn {args.ffn}")
    s = stream(args.tokens, args.dim, gen)
    hidden = (torch.randn(args.tokens, args.ffn, device=DEV, generator=gen) * 1.5 - 0.3).to(BF16)
    print(f"{'stage':40s} {'unfused ms':>10s} {'fused ms':>9s} {'gain':>6s} {'fused GB/s':>10s}  bit-identical")
    total_old = total_new = 0.0
    for name, unfused, fused, nbytes in stage_cases(s, hidden):
        identical = identity(fused(), unfused())
        old_ms, new_ms = ms(unfused), ms(fused)
        if not name.startswith(" "):  # indented rows: a launch setting of the row above
            total_old, total_new = total_old + old_ms, total_new + new_ms
        print(f"{name:40s} {old_ms:10.3f} {new_ms:9.3f} {old_ms / new_ms:5.2f}x {nbytes / new_ms / 1e6:10.0f}  "
              f"{identical}")
    print(f"{'sum of the stages':40s} {total_old:10.3f} {total_new:9.3f}")
    del s, hidden
    two_pass, epilogue, rel = gelu_epilogue(args.tokens, args.dim, args.ffn, gen)
    print(f"bf16 FFN up + GELU: linear then torch GELU {two_pass:.3f} ms, cuBLASLt GELU epilogue {epilogue:.3f} ms "
          f"({two_pass / epilogue:.2f}x), relative difference {rel:.2e}")
    if args.block_tokens:
        block_comparison(args.block_tokens // 21, 21, args.dim, args.ffn, gen)


if __name__ == "__main__":
    main()
