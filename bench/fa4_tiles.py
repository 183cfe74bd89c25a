"""FlashAttention-4 forward tile configs at the Wan self-attention shapes, against FA4's own choice and cuDNN.

FA4's sm90 forward for head dim 128 uses 128x128 tiles, P.V from registers (`mma_pv_is_rs`) and intra-warpgroup
overlap; FlashAttention-3's tile table uses 128x176 there. This sweeps tile_n x mma_pv_is_rs x intra_wg_overlap
(and tile_m: 192 = three MMA warpgroups) through the call the pack's adapter makes for a config listed in
`attention_kernels.FA4_TUNED_CONFIGS` (FA4's internal forward; its public function takes no tile arguments), so a
winner can go straight into that table. Each new config JIT-compiles once (about 2 s); a config FA4 refuses (on
sm90: P.V from shared memory with tile_n >= 160 needs more than 227 KB of shared memory) is listed as refused.
H200 (docs/BENCHMARKS.md): 192x128, P.V in registers, no overlap, 1.03-1.04x FA4's own 128x128; listed.
Rows print as they are measured (a config that breaks the CUDA context ends the run, the rows before it stay),
then a table per shape sorted by speed. TFLOP/s = 4 * L^2 * H * D / time; error against float32
SDPA on 256 sampled query rows, and the worst such error at the other Wan shapes (text, CLIP and audio
cross-attention, the odd shape: key lengths shorter than a tile and not a multiple of it).

    python3 bench/fa4_tiles.py                              # 6 tile_n x 2 x 2 = 24 configs, 32,760 and 75,600 tokens
    python3 bench/fa4_tiles.py --tile-n 128,176 --tokens 32760
    python3 bench/fa4_tiles.py --tile-m 192 --tile-n 96,112,128    # three MMA warpgroups
    python3 bench/fa4_tiles.py --alternate 6     # FA4's own config against the listed one, A B / B A, 6 rounds
    python3 bench/fa4_tiles.py --alternate 3 --in-forward    # the same over whole fp8 forwards (14B, random)
"""
import argparse
import itertools
import time

import torch

from _common import cuda_time, import_pack, write_result
from attention import SHAPES, fp32_rows_reference, seconds_per_call
from forward import build_model, forward_inputs, run_forward

HEADS, HEAD_DIM = 40, 128


def wan_inputs(b: int, lq: int, lk: int):
    """q, k, v as the model makes them (views of linear outputs, [B, L, H, D] bf16), and the float32 reference on
    256 sampled rows."""
    g = torch.Generator(device="cuda").manual_seed(lq * lk)
    q, k, v = (torch.randn(b, n, HEADS * HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
               .view(b, n, HEADS, HEAD_DIM) for n in (lq, lk, lk))
    rows = torch.randperm(lq, device="cuda", generator=g)[:256]
    return (q, k, v), rows, fp32_rows_reference(q, k, v, rows)


def rel_err(run, inputs, rows, ref) -> float:
    out = run(*inputs)
    return ((out[:, rows].float() - ref).norm() / ref.norm()).item()


def candidates(tile_ms, tile_ns):
    """None (FA4's own config), then every tile_m x tile_n x mma_pv_is_rs x intra_wg_overlap (tile_m 192: three
    MMA warpgroups instead of two)."""
    yield None
    for tile_m, tile_n, rs, overlap in itertools.product(tile_ms, tile_ns, (True, False), (True, False)):
        yield dict(tile_mn=(tile_m, tile_n), mma_pv_is_rs=rs, intra_wg_overlap=overlap)


def label(config) -> str:
    if config is None:
        return "FA4 default"
    tile_m, tile_n = config["tile_mn"]
    return f"{tile_m}x{tile_n} rs={int(config['mma_pv_is_rs'])} overlap={int(config['intra_wg_overlap'])}"


def measure(run, inputs, rows, ref, repeats):
    """(TFLOP/s, rel. error) of `run(q, k, v)` at one shape."""
    err = rel_err(run, inputs, rows, ref)
    q, k, v = inputs
    tokens = q.shape[1]
    flops = 4 * tokens * tokens * HEADS * HEAD_DIM
    return flops / seconds_per_call(lambda: run(q, k, v), repeats) / 1e12, err


def fa4_runner(kernels, config):
    """FA4's own config (its public function), or a tile config through the call the pack's adapter makes for a
    listed one (`attention_kernels._fa4_tuned`)."""
    call = kernels._fa4_default if config is None else kernels._fa4_tuned(config)
    scale = HEAD_DIM ** -0.5

    def run(q, k, v):
        out = call(q, k, v, scale)
        return out[0] if isinstance(out, tuple) else out
    return run


def cudnn_runner(kernels):
    cudnn = kernels.KERNELS["sdpa_cudnn"].run
    scale = HEAD_DIM ** -0.5
    return lambda q, k, v: cudnn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale,
                                 mask=None).transpose(1, 2)


def compile_first(run, inputs) -> tuple[float, str | None]:
    """Seconds of the first (compiling) call, and FA4's refusal if it refused the config."""
    start = time.perf_counter()
    try:
        run(*inputs)
        torch.cuda.synchronize()
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as err:   # an assert in FA4's config checks or a failed build: the config is refused
        torch.cuda.synchronize()   # a broken CUDA context raises here and ends the run
        return time.perf_counter() - start, f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:120]}"
    return time.perf_counter() - start, None


def sweep(kernels, shapes, args, device) -> None:
    """Every candidate config at every shape (rows as measured), then one table per shape sorted by speed."""
    short_shapes = [wan_inputs(b, lq, lk) for b, lq, lk, _, _ in SHAPES.values() if lq != lk]
    cudnn = cudnn_runner(kernels)
    cudnn_short_err = max(rel_err(cudnn, *shape) for shape in short_shapes)
    results = {n: [("cuDNN", *measure(cudnn, *shapes[n], args.repeats), cudnn_short_err)] for n in shapes}
    first = next(iter(shapes))
    for config in candidates([int(m) for m in args.tile_m.split(",")], [int(n) for n in args.tile_n.split(",")]):
        run = fa4_runner(kernels, config)
        compile_s, refusal = compile_first(run, shapes[first][0])
        if refusal is not None:
            print(f"{label(config)}: refused ({refusal})")
            continue
        short_err = max(rel_err(run, *shape) for shape in short_shapes)
        for n, (inputs, rows, ref) in shapes.items():
            tflops, err = measure(run, inputs, rows, ref, args.repeats)
            results[n].append((label(config), tflops, err, short_err))
            print(f"{label(config)} at {n}: {tflops:.0f} TFLOP/s, rel. err {err:.4f}, other Wan shapes "
                  f"{short_err:.4f} (first call {compile_s:.1f} s)")
            write_result("fa4_tiles", dict(config=config, tokens=n, tflops=round(tflops, 1), rel_err=round(err, 5),
                                           other_shapes_rel_err=round(short_err, 5), first_call_s=round(compile_s, 2),
                                           device=device, torch=torch.__version__))
    for n, rows in results.items():
        default = next(row[1] for row in rows if row[0] == "FA4 default")
        print(f"\n## self-attention, {n} tokens\n| config | TFLOP/s | x FA4 default | rel. err | other Wan shapes |"
              "\n|---|---|---|---|---|")
        for name, tflops, err, short_err in sorted(rows, key=lambda r: -r[1]):
            print(f"| {name} | {tflops:.0f} | {tflops / default:.3f} | {err:.4f} | {short_err:.4f} |")


def listed_config(kernels) -> dict:
    listed = kernels.FA4_TUNED_CONFIGS.get((torch.cuda.get_device_capability(), torch.bfloat16, HEAD_DIM, 1))
    if listed is None:
        raise SystemExit("no tuned FlashAttention-4 config listed for this GPU")
    return listed


def alternated(rounds: int, own, tuned) -> list[tuple]:
    """(own(), tuned()) per round, called A B then B A in turn, so drift during the run hits both alike."""
    results = []
    for r in range(rounds):
        if r % 2:
            b = tuned()
            a = own()
        else:
            a = own()
            b = tuned()
        results.append((a, b))
    return results


def report_speedups(what: str, speedups: list[float], config: dict, device) -> None:
    median = sorted(speedups)[len(speedups) // 2]
    print(f"{what}: {label(config)} / FA4 own speed, median of {len(speedups)} rounds x{median:.3f} "
          f"(min {min(speedups):.3f}, max {max(speedups):.3f})")
    write_result("fa4_tiles_ab", dict(what=what, config=config, speedups=[round(x, 4) for x in speedups],
                                      median=round(median, 4), device=device, torch=torch.__version__))


def alternate(kernels, shapes, rounds: int, repeats: int, device) -> None:
    """FA4's own config against the one listed for this GPU, alternated `rounds` times at each shape: a few
    percent told apart from drift between runs by the per-round ratios and their median."""
    listed = listed_config(kernels)
    own, tuned = fa4_runner(kernels, None), fa4_runner(kernels, listed)
    for n, (inputs, rows, ref) in shapes.items():
        pairs = alternated(rounds, lambda: measure(own, inputs, rows, ref, repeats),
                           lambda: measure(tuned, inputs, rows, ref, repeats))
        for r, ((own_tflops, own_err), (tuned_tflops, tuned_err)) in enumerate(pairs):
            print(f"{n} tokens, round {r + 1}: FA4 own {own_tflops:.0f}, listed {tuned_tflops:.0f} TFLOP/s, "
                  f"rel. err {own_err:.4f} / {tuned_err:.4f}")
        report_speedups(f"self-attention {n} tokens", [t[0] / o[0] for o, t in pairs], listed, device)


def alternate_in_forward(kernels, rounds: int, device) -> None:
    """The same alternation over whole fp8 forwards (Wan I2V 14B + InfiniteTalk, 480x832x81, random weights):
    FA4 runs between the GEMMs there, under another power and clock state than alone. The config is switched by
    swapping the call the adapter keeps for the compiled family."""
    listed = listed_config(kernels)
    model, _ = build_model("keys_infinitetalk.txt", torch.device("cuda"), "fp8_e4m3fn_scaled_fast", "auto")
    inputs = forward_inputs(model, 81, 480, 832, torch.device("cuda"))
    with torch.no_grad():
        run_forward(model, inputs)
    family = next(f for f in kernels._fa4_compiled if f[:3] == (torch.bfloat16, HEAD_DIM, 1))

    def timed(call):
        def run():
            kernels._fa4_compiled[family] = call
            with torch.no_grad():
                times = sorted(cuda_time(lambda: run_forward(model, inputs), warmup=1, repeats=3))
            return times[1]
        return run
    pairs = alternated(rounds, timed(kernels._fa4_default), timed(kernels._fa4_tuned(listed)))
    for r, (own_s, tuned_s) in enumerate(pairs):
        print(f"fp8 forward, round {r + 1}: FA4 own {own_s:.3f} s, listed {tuned_s:.3f} s")
    report_speedups("fp8 forward", [o / t for o, t in pairs], listed, device)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tile-m", default="128")
    p.add_argument("--tile-n", default="112,128,144,160,176,192")
    p.add_argument("--tokens", default="32760,75600", help="self-attention lengths (81 frames 480x832, 720x1280)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--alternate", type=int, default=0, metavar="ROUNDS",
                   help="instead of the sweep: FA4's own config against the listed one, alternated ROUNDS times")
    p.add_argument("--in-forward", action="store_true", help="with --alternate: over whole fp8 forwards")
    args = p.parse_args()
    import_pack()
    from wantalk.wanvideo.modules import attention_kernels as kernels

    missing = kernels.KERNELS["flash_attn_4"].unavailable()
    if missing is not None:
        raise SystemExit(missing)
    device = torch.cuda.get_device_name()
    print(f"# {device} (sm{''.join(map(str, torch.cuda.get_device_capability()))}), torch {torch.__version__}, "
          f"B 1 H {HEADS} D {HEAD_DIM} bf16, median of {args.repeats} timed batches")
    if args.alternate and args.in_forward:
        alternate_in_forward(kernels, args.alternate, device)
        return
    shapes = {int(n): wan_inputs(1, int(n), int(n)) for n in args.tokens.split(",")}
    if args.alternate:
        alternate(kernels, shapes, args.alternate, args.repeats, device)
    else:
        sweep(kernels, shapes, args, device)


if __name__ == "__main__":
    main()
