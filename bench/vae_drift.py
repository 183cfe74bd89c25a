"""VAE precision drift over the windows of a long video: bf16 (or fp16) against fp32.

The official InfiniteTalk loop decodes every window in fp32 and re-encodes the window's last `motion_frames`
frames as the next window's pinned motion latents, so VAE rounding can accumulate from window to window. This
script runs that chain twice from the same inputs, once with an fp32 VAE and once with a low-precision copy of the
same weights (random weights with the real Wan 2.1 shapes and channel widths), with the same "generated" latents
standing in for the DiT, and reports per window the relative error of the decoded frames against the fp32 chain.

    python bench/vae_drift.py --windows 10 --height 64 --width 64 --frame-window 17 --motion-frames 9 [--device cpu]
"""
import argparse
import time

import torch

from _common import import_pack, random_vae_state_dict, write_result
from vae import smooth_clip


def relative_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    return float((x.double() - reference.double()).norm() / reference.double().norm())


def run_chain(vae, first: torch.Tensor, generated: list, motion_frames: int) -> list:
    """Decoded windows of the official chain: motion latents = encode(last motion frames), pinned in front of
    that window's generated latents, decoded; window 0 starts from `first` (the conditioning frame)."""
    motion_pixels, windows = first, []
    for latents in generated:
        motion = vae.encode(motion_pixels.to(vae.dtype))
        latent = torch.cat([motion, latents[:, :, motion.shape[2]:]], dim=2)
        video = vae.decode(latent).float()
        windows.append(video)
        motion_pixels = video[:, :, -motion_frames:]
    return windows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--windows", type=int, default=10)
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--frame-window", type=int, default=17)
    p.add_argument("--motion-frames", type=int, default=9)
    p.add_argument("--low", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import_pack()
    from wantalk.wanvideo.vae import WanVAE

    device = torch.device(args.device)
    state = random_vae_state_dict(device)
    reference = WanVAE.from_state_dict(state, device=device, dtype=torch.float32)
    low = WanVAE.from_state_dict(state, device=device, dtype=getattr(torch, args.low))
    gen = torch.Generator(device=device).manual_seed(1)
    lat = (16, 1 + (args.frame_window - 1) // 4, args.height // 8, args.width // 8)
    generated = [torch.randn(1, *lat, device=device, generator=gen) for _ in range(args.windows)]
    first = smooth_clip(1, args.height, args.width, device)

    with torch.no_grad():
        single_encode = relative_error(low.encode(first.to(low.dtype)), reference.encode(first))
        single_decode = relative_error(low.decode(generated[0]), reference.decode(generated[0]))
        began = time.perf_counter()
        fp32 = run_chain(reference, first, generated, args.motion_frames)
        lowp = run_chain(low, first, generated, args.motion_frames)
        seconds = time.perf_counter() - began
    per_window = [round(relative_error(b, a), 5) for a, b in zip(fp32, lowp)]
    max_levels = [round(float((b - a).abs().max()) * 127.5, 2) for a, b in zip(fp32, lowp)]   # 8-bit levels
    write_result("vae_drift", {
        "bench": "vae_drift", "low": args.low, "device": str(device), "torch": torch.__version__,
        "size": f"{args.height}x{args.width}", "frame_window": args.frame_window,
        "motion_frames": args.motion_frames, "windows": args.windows,
        "single_encode_rel": round(single_encode, 5), "single_decode_rel": round(single_decode, 5),
        "chain_rel_per_window": per_window, "chain_max_abs_8bit_levels": max_levels,
        "seconds": round(seconds, 1)})


if __name__ == "__main__":
    main()
