"""Low-VRAM runs of full-size Wan 2.1 I2V 14B + InfiniteTalk: peak memory and speed on emulated 12/16/24 GB cards.

The model is assembled from the official key listing (real shapes, random weights) through the pack's loader
path, quantized on the GPU, then moved to the host (as `load_device=offload_device` leaves it). Each case:
- uncapped: the whole model resident, no swap (the speed reference of its quantization mode);
- capped: `torch.cuda.set_per_process_memory_fraction` limits the process to the card's size, block swap auto
  picks how many blocks stream, and a forward pass runs under the cap.
What is timed: seconds per DiT forward at 480x832, 81 frames (32,760 tokens), InfiniteTalk one speaker (CUDA events,
median after one warm-up); seconds per step = forwards per step (3 with text and audio guidance) x that. A full
40-step window takes ~6 minutes per setting, too long for the device budget. "Two windows": each capped case runs
window 1 forwards, releases the model's VRAM and runs a tiled VAE decode (random VAE weights) under the same cap,
then window 2 forwards; the peak of window 2 must not exceed window 1's (no growth across windows).
A cap too small for any setting must raise the planning error (MemoryPlanError), not a CUDA OOM.
The cap does not see the CUDA context (~0.5 GB on a real card), so a real card has that much less.

    python bench/memory.py            # fp4 in 12 GB, fp8 in 16 GB, fp8 in 24 GB, and a 4 GB cap (must refuse)
    python bench/memory.py --quick    # 33 frames, no VAE, fewer repeats: a smoke run
    python bench/memory.py --sweep    # frames 5..161, 480p/720p, 1-2 speakers, fp8/fp4, 8-24 GB (memory_sweep.py)
"""
import argparse
import gc
import sys
import time

import torch

from _common import add_clip_size_args, cuda_time, import_pack, random_vae_state_dict, reference_shapes, write_result
from forward import forward_inputs, random_fetch, run_forward

GB = 10**9
GIB = 2**30


def set_cap(total: int, cap_gb: float | None) -> None:
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(1.0 if cap_gb is None else min(1.0, cap_gb * GB / total))


def build(shapes, mode: str, listing: str):
    from wantalk.wanvideo.loader import assemble_model
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    t0 = time.perf_counter()
    model = assemble_model(shapes, random_fetch(shapes, device, torch.bfloat16, gen), device=device,
                           base_dtype=torch.bfloat16, quantization=mode, files=(listing,))
    torch.cuda.synchronize()
    return model, time.perf_counter() - t0


def forward_call(model, frames: int, height: int, width: int, speakers: int = 1, device="cuda"):
    """One conditional forward over bench/forward.py's random inputs, as a call to time."""
    inputs = forward_inputs(model, frames, height, width, torch.device(device), speakers)
    return lambda: run_forward(model, inputs)


def timed(fn, repeats: int):
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        times = cuda_time(fn, 1, repeats)
    return sorted(times)[len(times) // 2], torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()


def vae_decode_under_cap(args, plan_module):
    """Tiled decode of one window's latents with random full-size VAE weights; (seconds, peak, estimate)."""
    from wantalk.wanvideo.vae import WanVAE
    device = torch.device("cuda")
    vae = WanVAE.from_state_dict(random_vae_state_dict(device, seed=2), device=device, dtype=torch.bfloat16)
    lat = torch.randn(1, 16, (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8, device=device)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    with torch.no_grad():
        video = vae.decode(lat, tile_size=args.tile, tile_overlap=64)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() - base
    estimate = plan_module.vae_decode_bytes(plan_module.DecodeSettings(args.frames, args.height, args.width,
                                                                       args.tile, dtype_bytes=2))
    del vae, video, lat
    gc.collect()
    torch.cuda.empty_cache()
    return seconds, peak, estimate


def capped_case(model, args, total, cap_gb, mode, uncapped_s, passes, speakers=1, vae=False):
    from wantalk.wanvideo import block_swap, memory_plan
    block_swap.release_vram(model)  # each case starts as on a fresh card of its size
    set_cap(total, cap_gb)
    swapper = block_swap.configure_block_swap(model, -1, device="cuda", prefetch=args.prefetch)
    fn = forward_call(model, args.frames, args.height, args.width, speakers)
    t0 = time.perf_counter()
    try:
        s, peak, reserved = timed(fn, args.repeats)
    except memory_plan.MemoryPlanError as exc:
        result = {"case": f"{mode} {cap_gb} GB", "refused": True, "message": str(exc),
                  "seconds_to_refuse": time.perf_counter() - t0}
        write_result("memory", {"bench": "memory", **result})
        return result
    plan = swapper.plan
    result = {"case": f"{mode} {cap_gb} GB" + (f" {speakers} speakers" if speakers > 1 else ""),
              "quantization": mode, "cap_gb": cap_gb, "speakers": speakers,
              "blocks_to_swap": swapper.blocks_to_swap, "prefetch": args.prefetch,
              "seconds_per_forward": s, "seconds_per_step": s * passes,
              "speed_vs_uncapped": uncapped_s / s if uncapped_s else None,
              "peak_gib": peak / GIB, "reserved_gib": reserved / GIB, "planned_peak_gib": plan.peak / GIB,
              "planned_activations_gib": plan.activations / GIB, "pinned_host_gib": swapper.pinned_bytes() / GIB}
    if vae:
        freed = block_swap.release_vram(model)
        dec_s, dec_peak, dec_est = vae_decode_under_cap(args, memory_plan)
        s2, peak2, _ = timed(fn, 1)  # window 2: blocks come back, same peak
        result.update({"released_gib": freed / GIB, "vae_decode_s": dec_s, "vae_decode_peak_gib": dec_peak / GIB,
                       "vae_decode_estimate_gib": dec_est / GIB, "window2_seconds_per_forward": s2,
                       "window2_peak_gib": peak2 / GIB, "no_growth": peak2 <= peak * 1.02})
    write_result("memory", {"bench": "memory", **result, "frames": args.frames,
                            "size": f"{args.height}x{args.width}", "device": torch.cuda.get_device_name(),
                            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")})
    return result


def run_mode(shapes, args, total, mode, caps, passes, extra=()):
    model, build_s = build(shapes, mode, args.listing)
    weights = torch.cuda.memory_allocated()
    uncapped_s, peak, _ = timed(forward_call(model, args.frames, args.height, args.width), args.repeats)
    write_result("memory", {"bench": "memory", "case": f"{mode} uncapped", "quantization": mode,
                            "seconds_per_forward": uncapped_s, "seconds_per_step": uncapped_s * passes,
                            "peak_gib": peak / GIB, "weights_gib": weights / GIB, "build_s": build_s})
    results = [{"case": f"{mode} uncapped", "seconds_per_forward": uncapped_s, "peak_gib": peak / GIB}]
    model.to("cpu")  # as load_device=offload_device leaves it
    gc.collect()
    torch.cuda.empty_cache()
    for i, cap in enumerate(caps):
        results.append(capped_case(model, args, total, cap, mode, uncapped_s, passes, vae=args.vae and i == 0))
    for cap, speakers in extra:
        results.append(capped_case(model, args, total, cap, mode, uncapped_s, passes, speakers=speakers))
    set_cap(total, None)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return results


def main():
    if "--sweep" in sys.argv[1:]:
        import memory_sweep
        return memory_sweep.main(sys.argv[1:])
    p = argparse.ArgumentParser()
    p.add_argument("--listing", default="keys_infinitetalk.txt")
    add_clip_size_args(p)
    p.add_argument("--fp4", default="fp4", help="the fp4 mode for the 12 GB case")
    p.add_argument("--fp8", default="fp8_e4m3fn_scaled_fast", help="the fp8 mode for the 16/24 GB cases")
    p.add_argument("--prefetch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--tile", type=int, default=256)
    p.add_argument("--too-small", type=float, default=None,
                   help="a cap (GB) that no setting fits (default 4; 2 with --quick)")
    p.add_argument("--quick", action="store_true", help="33 frames, 1 repeat, no VAE decode, no 24 GB case")
    args = p.parse_args()
    if args.quick:
        args.frames, args.repeats = 33, 1
    args.vae = not args.quick
    if args.too_small is None:
        args.too_small = 2.0 if args.quick else 4.0
    import_pack()
    from wantalk.wanvideo.sampling import Guidance

    passes = len(Guidance("infinitetalk").passes(500.0))
    shapes = reference_shapes(args.listing)
    total = torch.cuda.get_device_properties(0).total_memory
    summary = []
    extra = [] if args.quick else [(12, 2)]
    summary += run_mode(shapes, args, total, args.fp4, [12, args.too_small], passes, extra)
    summary += run_mode(shapes, args, total, args.fp8, [16] if args.quick else [16, 24], passes)
    print("\ncase | blocks swapped | s/forward | s/step | speed vs uncapped | peak GiB (planned)")
    for r in summary:
        if r.get("refused"):
            print(f"{r['case']} | refused before sampling: {r['message'].splitlines()[0]}")
            continue
        print(f"{r['case']} | {r.get('blocks_to_swap', 0)} | {r['seconds_per_forward']:.3f} | "
              f"{r['seconds_per_forward'] * passes:.2f} | "
              f"{r.get('speed_vs_uncapped') or 1.0:.2f} | {r['peak_gib']:.2f}"
              + (f" ({r['planned_peak_gib']:.2f})" if "planned_peak_gib" in r else ""))


if __name__ == "__main__":
    main()
