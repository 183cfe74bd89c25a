"""Full-size InfiniteTalk long video on random weights: seconds per step, per window, peak GPU memory.

Wan 2.1 I2V 14B + InfiniteTalk assembled from the official key listing (random weights) through the loader path,
a real-size Wan VAE (random weights), 480x832, 81-frame windows with 9 motion frames, audio long enough for two
windows (153 frames at 25 fps), the pack's own `generate_long_video` (the code the sampler node runs).
Steps are reduced (default 4) to fit the device budget; time per step is what a 40-step run pays per step.

    python bench/long_video.py --steps 4 --quantization fp8_e4m3fn_scaled_fast
"""
import argparse
import time

import torch

from _common import import_pack, reference_shapes, write_result
from forward import random_fetch


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--quantization", default="fp8_e4m3fn_scaled_fast")
    p.add_argument("--attention", default="auto")
    p.add_argument("--frames", type=int, default=153, help="audio length in video frames (153 = two windows)")
    p.add_argument("--vae-dtype", default="bf16", choices=("bf16", "fp32"))
    args = p.parse_args()
    import_pack()
    from wantalk.multitalk.long_video import LongVideoSettings, TalkAudio, generate_long_video
    from wantalk.wanvideo.loader import assemble_model
    from wantalk.wanvideo.sampling import Conditioning
    from wantalk.wanvideo.vae import WanVAE

    device = torch.device("cuda")
    shapes = reference_shapes("keys_infinitetalk.txt")
    gen = torch.Generator(device=device).manual_seed(0)
    model = assemble_model(shapes, random_fetch(shapes, device, torch.bfloat16, gen), device=device,
                           quantization=args.quantization, attention_mode=args.attention,
                           files=("keys_infinitetalk.txt",))
    vae_dtype = torch.bfloat16 if args.vae_dtype == "bf16" else torch.float32
    vae = WanVAE(device=device, dtype=vae_dtype).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    image = (torch.rand(3, 480, 832, generator=g) * 2 - 1).to(device)
    audio = TalkAudio([torch.randn(args.frames, 12, 768, generator=g)])
    text = Conditioning(torch.randn(1, 120, 4096, generator=g).to(device),
                        torch.randn(1, 60, 4096, generator=g).to(device),
                        torch.randn(1, 257, 1280, generator=g).to(device))
    settings = LongVideoSettings(steps=args.steps, seed=3)
    step_times, window_times = [], []
    marks = {"step": time.perf_counter(), "window": time.perf_counter()}

    def on_step(window, windows, step, steps):
        torch.cuda.synchronize()
        now = time.perf_counter()
        step_times.append(now - marks["step"])
        marks["step"] = now

    def on_window(index, frames):
        now = time.perf_counter()
        window_times.append(now - marks["window"])
        marks["window"] = marks["step"] = now

    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with torch.no_grad():
        video = generate_long_video(model, vae, image, audio, text, settings, on_step=on_step, on_window=on_window)
    total = time.perf_counter() - t0
    steady = sorted(step_times[1:])  # the first step of a run includes warm-up
    write_result("long_video", {
        "bench": "long_video", "quantization": args.quantization, "attention": args.attention, "steps": args.steps,
        "passes_per_step": 3, "frames_out": int(video.shape[0]), "windows": len(window_times),
        "seconds_per_step_median": steady[len(steady) // 2], "seconds_per_window": window_times,
        "seconds_total": total, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "vae_dtype": args.vae_dtype, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d")})


if __name__ == "__main__":
    main()
