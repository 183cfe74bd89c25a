"""Full-size Wan 2.1 forward with random weights: seconds per forward and peak GPU memory.

The model is assembled from the official key listing (real shapes) through the pack's own loader path
(meta build, quantization policy, per-tensor materialisation), with random tensors instead of a file.

    python bench/forward.py --listing keys_i2v14b.txt --frames 81 --height 480 --width 832
    python bench/forward.py --listing keys_infinitetalk.txt --gguf Q4_K   # city96-layout GGUF blocks
"""
import argparse
import time

import torch

from _common import cuda_time, import_pack, reference_shapes, write_result


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


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--listing", default="keys_i2v14b.txt")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--quantization", default="disabled")
    p.add_argument("--gguf", default=None, help="GGUF block type of the tensors city96's tools quantize (Q8_0, Q4_K...)")
    p.add_argument("--attention", default="auto")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--speakers", type=int, default=1, help="InfiniteTalk: 1 or 2 speakers")
    p.add_argument("--profile", action="store_true", help="print the top CUDA kernels of one forward")
    p.add_argument("--compare-attention", default=None,
                   help="also time the same forward with this attention mode; report the output's relative difference")
    args = p.parse_args()
    import_pack()
    from wantalk.wanvideo.loader import assemble_model

    device = torch.device("cuda")
    shapes = reference_shapes(args.listing)
    gen = torch.Generator(device=device).manual_seed(0)
    t0 = time.perf_counter()
    fetch, stored = random_fetch(shapes, device, torch.bfloat16, gen), {}
    if args.gguf:
        from gguf_weights import gguf_source
        fetch, stored = gguf_source(shapes, args.gguf, fetch, gen)
    model = assemble_model(shapes, fetch, device=device, stored=stored,
                           base_dtype=torch.bfloat16, quantization=args.quantization, attention_mode=args.attention,
                           files=(args.listing,))
    torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    weights_gib = torch.cuda.memory_allocated() / 2**30
    cfg = model.cfg
    lat_f, lat_h, lat_w = (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8
    x = torch.randn(1, 16, lat_f, lat_h, lat_w, device=device)
    y = torch.randn(1, cfg.in_dim - 16, lat_f, lat_h, lat_w, device=device) if cfg.in_dim > 16 else None
    ctx = torch.randn(1, 512, cfg.text_dim, device=device)
    clip = torch.randn(1, 257, cfg.clip_dim, device=device) if cfg.image_branch else None
    audio = None
    if cfg.audio is not None:
        extra = {"speakers": args.speakers} if args.speakers != 1 else {}
        audio = cfg.audio.random_conditioning(model, lat_f, device, **extra)
    t = torch.tensor([700.0], device=device)
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        times = cuda_time(lambda: model.forward_batched(x, t, ctx, clip, y, audio=audio), 1, args.repeats)
    tokens = lat_f * (lat_h // 2) * (lat_w // 2)
    comparison = {}
    if args.compare_attention:
        with torch.no_grad():
            reference = model.forward_batched(x, t, ctx, clip, y, audio=audio)
            model.set_attention_mode(args.compare_attention)
            other_times = cuda_time(lambda: model.forward_batched(x, t, ctx, clip, y, audio=audio), 1, args.repeats)
            other = model.forward_batched(x, t, ctx, clip, y, audio=audio)
            model.set_attention_mode(args.attention)
        comparison = {"compare_attention": args.compare_attention,
                      "compare_seconds_per_forward": sorted(other_times)[len(other_times) // 2],
                      "output_rel_diff": ((other - reference).norm() / reference.norm()).item()}
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
            model.forward_batched(x, t, ctx, clip, y, audio=audio)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90))
    write_result("forward", {
        "bench": "forward", "listing": args.listing, "addon": model.addon_name, "quantization": args.quantization,
        "gguf": args.gguf,
        "attention": args.attention, "speakers": args.speakers, "frames": args.frames, "size": f"{args.height}x{args.width}", "tokens": tokens,
        "seconds_per_forward": sorted(times)[len(times) // 2], "all_seconds": times,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "weights_gib": weights_gib, "build_s": build_s,
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
        **comparison})


if __name__ == "__main__":
    main()
