"""Video dubbing and chained samplers through the window engine: seconds per window and peak memory.

Wan 2.1 I2V 14B + InfiniteTalk assembled from the official key listing (random weights, generated on the GPU)
through the loader path, a real-size Wan VAE (random weights), 480x832, 81-frame windows with 9 motion frames:
1. dubbing: a synthetic moving 30 fps video (frames made on access: only the windows' reference frames are read)
   and 225 audio frames = 3 windows, each with its own reference frame;
2. a chained pair: sampler A makes the first window (max_frames 81), sampler B continues from A's frames
   (previous_frames) on the same audio for the next window; peak and resident GPU memory per sampler.
Guidance 1 (one pass per step, the distilled form) and 4 steps keep it inside the device budget; a step with text
and audio guidance costs 3 passes (bench/long_video.py).

    python bench/dubbing.py --steps 4 --quantization fp8_e4m3fn_scaled_fast
    python bench/dubbing.py --tiny          # CPU, tiny random weights: checks the script
"""
import argparse
import math
import os
import sys
import time

import torch

from _common import import_pack, reference_shapes, write_result


class MovingVideo:
    """A synthetic video whose frame i (`[3, H, W]` in [-1, 1]) is made when read: moving colour bands."""

    def __init__(self, count: int, height: int, width: int, device):
        self.count, self.height, self.width, self.device = count, height, width, device
        self.reads = []

    def __len__(self):
        return self.count

    def __getitem__(self, i: int) -> torch.Tensor:
        if i < 0:
            i += self.count
        self.reads.append(i)
        y = torch.linspace(0, 1, self.height, device=self.device)[:, None]
        x = torch.linspace(0, 1, self.width, device=self.device)[None, :]
        phase = i / self.count * 2 * math.pi
        return torch.stack([torch.sin(6 * x + phase + c) * torch.cos(4 * y - phase) for c in (0.0, 2.1, 4.2)])


def build(args):
    """(model, vae, height, width, frame_window, motion_frames, text tensors) at real or tiny size."""
    from wantalk.wanvideo.sampling import Conditioning
    if args.tiny:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
        from tiny_models import tiny_infinitetalk, tiny_vae
        g = torch.Generator().manual_seed(0)
        model, _ = tiny_infinitetalk(g)
        vae, _ = tiny_vae(g)
        text = Conditioning(torch.randn(1, 5, 64, generator=g), torch.randn(1, 3, 64, generator=g),
                            torch.randn(1, 257, 32, generator=g))
        return model, vae, 32, 48, 9, 5, text, (2, 16)
    from forward import random_fetch
    from wantalk.wanvideo.loader import assemble_model
    from wantalk.wanvideo.vae import WanVAE
    device = torch.device("cuda")
    shapes = reference_shapes("keys_infinitetalk.txt")
    gen = torch.Generator(device=device).manual_seed(0)
    model = assemble_model(shapes, random_fetch(shapes, device, torch.bfloat16, gen), device=device,
                           quantization=args.quantization, files=("keys_infinitetalk.txt",))
    vae = WanVAE(device=device, dtype=torch.bfloat16).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    text = Conditioning(torch.randn(1, 120, 4096, generator=g).to(device),
                        torch.randn(1, 60, 4096, generator=g).to(device),
                        torch.randn(1, 257, 1280, generator=g).to(device))
    return model, vae, 480, 832, 81, 9, text, (12, 768)


def gib(x: int) -> float:
    return round(x / 2**30, 3)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--quantization", default="fp8_e4m3fn_scaled_fast")
    p.add_argument("--tiny", action="store_true", help="tiny random weights on the CPU (checks the script)")
    args = p.parse_args()
    import_pack()
    from wantalk.multitalk.long_video import LongVideoSettings, TalkAudio, generate_long_video
    cuda = torch.cuda.is_available() and not args.tiny
    t0 = time.perf_counter()
    model, vae, height, width, window, motion, text, audio_shape = build(args)
    build_s = time.perf_counter() - t0
    stride = window - motion
    settings = LongVideoSettings(frame_window=window, motion_frames=motion, steps=args.steps, text_scale=1.0,
                                 audio_scale=1.0, seed=3)
    g = torch.Generator().manual_seed(2)
    audio = TalkAudio([torch.randn(window + 2 * stride, *audio_shape, generator=g)])   # 3 windows
    device = next(model.parameters()).device
    common = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "quantization": "tiny" if args.tiny else args.quantization,
              "steps": args.steps, "passes_per_step": 1, "size": f"{width}x{height}", "build_s": round(build_s, 1)}

    def timed(**kwargs):
        marks, times = [time.perf_counter()], []

        def on_window(index, frames):
            if cuda:
                torch.cuda.synchronize()
            times.append(round(time.perf_counter() - marks[-1], 2))
            marks.append(time.perf_counter())
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        video = generate_long_video(model, vae, kwargs.pop("frames"), audio, text, kwargs.pop("settings"),
                                    on_window=on_window, **kwargs)
        memory = {}
        if cuda:
            torch.cuda.synchronize()
            memory = {"peak_allocated_gib": gib(torch.cuda.max_memory_allocated()),
                      "peak_reserved_gib": gib(torch.cuda.max_memory_reserved()),
                      "allocated_after_gib": gib(torch.cuda.memory_allocated())}
        return video, {"seconds_per_window": times, "frames_out": int(video.shape[0]), **memory}

    source = MovingVideo(int(len(audio.features[0]) / 25 * 30) // 2, height, width, device)  # ends mid-video
    _, dubbing = timed(frames=source, settings=settings, fps=30.0)
    write_result("dubbing", {"bench": "dubbing", **common, "windows": 3, "video_frames": len(source), "fps": 30.0,
                             "reference_frames_read": sorted(set(source.reads)), **dubbing})
    image = source[0]
    first, sampler_a = timed(frames=image, settings=LongVideoSettings(**{**settings.__dict__, "max_frames": window}))
    second, sampler_b = timed(frames=image, settings=LongVideoSettings(**{**settings.__dict__,
                                                                        "max_frames": window + stride}),
                              previous_frames=first)
    write_result("dubbing", {"bench": "chained_samplers", **common, "sampler_a": sampler_a, "sampler_b": sampler_b,
                             "frames_out": int(first.shape[0] + second.shape[0])})


if __name__ == "__main__":
    main()
