"""Full-size Wan 2.1 forward with random weights: seconds per forward and peak GPU memory.

The model is assembled from the official key listing (real shapes) through the pack's own loader path
(meta build, quantization policy, per-tensor materialisation), with random tensors instead of a file.

    python bench/forward.py --listing keys_i2v14b.txt --frames 81 --height 480 --width 832
    python bench/forward.py --listing keys_infinitetalk.txt --gguf Q4_K   # city96-layout GGUF blocks
    python bench/forward.py --listing keys_infinitetalk.txt --top-kernels 30   # profile: the 30 costliest kernels
"""
import argparse
import math
import re
import time
from collections import defaultdict

import torch

from _common import add_clip_size_args, cuda_time, import_pack, reference_shapes, write_result


def random_fetch(shapes, device, dtype, generator):
    def fetch(key):
        shape = shapes[key]
        t = torch.randn(shape, device=device, dtype=torch.float32, generator=generator)
        if len(shape) >= 2:
            t = t / (torch.tensor(shape[1:]).prod().item() ** 0.5)
        elif "norm" in key and key.endswith("weight"):
            t = 1 + 0.1 * t
        else:
            t = 0.1 * t
        return t.to(dtype), {}
    return fetch


KERNEL_CATEGORIES = (   # first match wins; the rest is "elementwise and other"
    ("attention", re.compile(r"attn|attention|fmha|sdpa|flash", re.I)),
    ("gemm", re.compile(r"gemm|nvjet|xmma|matmul|cutlass|wgmma|tensorop|scaled_mm", re.I)),
    ("quantize", re.compile(r"quantize", re.I)),
)


def category(kernel_name: str) -> str:
    return next((name for name, pattern in KERNEL_CATEGORIES if pattern.search(kernel_name)), "elementwise/other")


def device_intervals(prof):
    """(name, start us, end us) of every GPU kernel and memcpy/memset the profiler recorded."""
    from torch.autograd import DeviceType
    return [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
            if e.device_type == DeviceType.CUDA]


def profile_summary(intervals, top: int = 25) -> dict:
    """GPU time per kernel category, the `top` kernels by total time, and the host gaps: the span from the first
    kernel's start to the last one's end minus the time some kernel ran (the GPU waiting on Python/launches)."""
    per_category, per_kernel, launches = defaultdict(float), defaultdict(float), defaultdict(int)
    busy, cursor = 0.0, None
    for name, start, end in sorted(intervals, key=lambda i: i[1]):
        per_category[category(name)] += end - start
        per_kernel[name] += end - start
        launches[name] += 1
        if cursor is None or start > cursor:
            busy += end - start
            cursor = end
        elif end > cursor:
            busy += end - cursor
            cursor = end
    span = max(i[2] for i in intervals) - min(i[1] for i in intervals) if intervals else 0.0
    ranked = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:top]
    return {"span_ms": round(span / 1e3, 2), "gpu_busy_ms": round(busy / 1e3, 2),
            "host_gaps_ms": round((span - busy) / 1e3, 2), "kernels": len(intervals),
            "by_category_ms": {k: round(v / 1e3, 2) for k, v in sorted(per_category.items())},
            "top_kernels": [dict(name=name[:120], count=launches[name], total_ms=round(t / 1e3, 2),
                                 category=category(name)) for name, t in ranked]}


def print_top_kernels(label: str, summary: dict, n: int) -> None:
    """The n kernels with the most GPU time in one profiled forward: which elementwise kernels cost what."""
    print(f"\n## top {n} kernels, {label}\n| kernel | launches | total ms | category |\n|---|---|---|---|")
    for row in summary.get("top_kernels", [])[:n]:
        print(f"| {row['name']} | {row['count']} | {row['total_ms']} | {row['category']} |")


def profiled(fn, top: int = 25) -> dict:
    from torch.profiler import ProfilerActivity, profile
    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    intervals = device_intervals(prof)
    if intervals:
        return profile_summary(intervals, top)
    per_category = defaultdict(float)   # no device events in this torch: totals only, no timeline
    for avg in prof.key_averages():
        per_category[category(avg.key)] += avg.self_device_time_total / 1e3
    return {"by_category_ms": {k: round(v, 2) for k, v in per_category.items()}, "note": "no device timeline"}


def build_model(listing: str, device, quantization: str, attention: str, gguf: str | None = None, shapes=None):
    """The pack's model from a key listing's shapes (or `shapes`) and random weights, through its own loader path.
    Returns the model and the seconds the build took."""
    from wantalk.wanvideo.loader import assemble_model
    shapes = shapes or reference_shapes(listing)
    gen = torch.Generator(device=device).manual_seed(0)
    t0 = time.perf_counter()
    fetch, stored = random_fetch(shapes, device, torch.bfloat16, gen), {}
    if gguf:
        from gguf_weights import gguf_source
        fetch, stored = gguf_source(shapes, gguf, fetch, gen)
    model = assemble_model(shapes, fetch, device=device, stored=stored, base_dtype=torch.bfloat16,
                           quantization=quantization, attention_mode=attention, files=(listing,))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return model, time.perf_counter() - t0


def forward_inputs(model, frames: int, height: int, width: int, device, speakers: int = 1) -> dict:
    """Random inputs of one conditional forward over a window of `frames` x `height` x `width` pixels: latents,
    image latents, timestep, text and CLIP features, and (InfiniteTalk) the projected audio conditioning."""
    cfg = model.cfg
    lat_f, lat_h, lat_w = (frames - 1) // 4 + 1, height // 8, width // 8
    audio = None
    if cfg.audio is not None:
        extra = {"speakers": speakers} if speakers != 1 else {}
        audio = cfg.audio.random_conditioning(model, lat_f, device, **extra)
    return dict(x=torch.randn(1, 16, lat_f, lat_h, lat_w, device=device),
                y=torch.randn(1, cfg.in_dim - 16, lat_f, lat_h, lat_w, device=device) if cfg.in_dim > 16 else None,
                ctx=torch.randn(1, 512, cfg.text_dim, device=device),
                clip=torch.randn(1, 257, cfg.clip_dim, device=device) if cfg.image_branch else None,
                t=torch.tensor([700.0], device=device), audio=audio)


def run_forward(model, inputs: dict, policy=None):
    i = inputs
    return model.forward_batched(i["x"], i["t"], i["ctx"], i["clip"], i["y"], audio=i["audio"],
                                 attention_policy=policy)


def host_cost(model, device, repeats: int = 10) -> dict:
    """Wall time of a forward at a tiny size (2 latent frames at 16x16: 128 tokens), where the GPU work is
    negligible: the host's cost per forward and per block (dispatch, launches, Python)."""
    inputs = forward_inputs(model, 5, 128, 128, device)
    run = lambda: run_forward(model, inputs)
    with torch.no_grad():
        run()
        torch.cuda.synchronize()
        walls = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            torch.cuda.synchronize()
            walls.append(time.perf_counter() - start)
    wall = sorted(walls)[len(walls) // 2]
    gpu = profiled(run)
    return {"tokens": 128, "wall_ms": round(wall * 1e3, 2),
            "per_block_ms": round(wall * 1e3 / len(model.blocks), 3), "gpu_busy_ms": gpu.get("gpu_busy_ms"),
            "kernels": gpu.get("kernels")}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--listing", default="keys_i2v14b.txt")
    add_clip_size_args(p)
    p.add_argument("--quantization", default="disabled")
    p.add_argument("--gguf", default=None, help="GGUF block type of the tensors city96's tools quantize (Q8_0, Q4_K...)")
    p.add_argument("--attention", default="auto")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--speakers", type=int, default=1, help="InfiniteTalk: 1 or 2 speakers")
    p.add_argument("--profile", action="store_true",
                   help="GPU time by kernel category and host gaps of one forward per attention mode")
    p.add_argument("--top-kernels", type=int, default=0, metavar="N",
                   help="print the N kernels with the most GPU time of each profiled forward (implies --profile)")
    p.add_argument("--host-cost", action="store_true", help="host time per forward and per block at 128 tokens")
    p.add_argument("--compare-attention", default=None,
                   help="comma-separated attention modes: also time the forward with each; report the output's "
                        "relative difference to the --attention forward")
    args = p.parse_args()
    args.profile = args.profile or args.top_kernels > 0
    top = max(25, args.top_kernels)
    import_pack()

    device = torch.device("cuda")
    model, build_s = build_model(args.listing, device, args.quantization, args.attention, args.gguf)
    weights_gib = torch.cuda.memory_allocated() / 2**30
    inputs = forward_inputs(model, args.frames, args.height, args.width, device, args.speakers)
    torch.cuda.reset_peak_memory_stats()
    forward = lambda policy=None: run_forward(model, inputs, policy)
    with torch.no_grad():
        times = cuda_time(forward, 1, args.repeats)
    tokens = math.prod(inputs["x"].shape[2:]) // 4
    comparisons, profiles = {}, {}
    if args.profile:
        profiles[args.attention] = profiled(forward, top)
    if args.compare_attention:
        with torch.no_grad():
            reference = forward()
            for mode in args.compare_attention.split(","):
                other_times = cuda_time(lambda: forward(mode), 1, args.repeats)
                other = forward(mode)
                comparisons[mode] = {"seconds_per_forward": sorted(other_times)[len(other_times) // 2],
                                     "output_rel_diff": ((other - reference).norm() / reference.norm()).item()}
                del other
                if args.profile:
                    profiles[mode] = profiled(lambda: forward(mode), top)
    for mode, summary in profiles.items():
        print(f"profile {args.quantization} {mode}: {summary}")
        if args.top_kernels:
            print_top_kernels(f"{args.quantization}, attention {mode}", summary, args.top_kernels)
    write_result("forward", {
        "bench": "forward", "listing": args.listing, "addon": model.addon_name, "quantization": args.quantization,
        "gguf": args.gguf,
        "attention": args.attention, "speakers": args.speakers, "frames": args.frames, "size": f"{args.height}x{args.width}", "tokens": tokens,
        "seconds_per_forward": sorted(times)[len(times) // 2], "all_seconds": times,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "weights_gib": weights_gib, "build_s": build_s,
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
        "compare": comparisons, "profiles": profiles,
        "host_cost": host_cost(model, device) if args.host_cost else None})


if __name__ == "__main__":
    main()
