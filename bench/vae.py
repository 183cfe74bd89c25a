"""Wan 2.1 VAE at full size: seconds and peak GPU memory of encode/decode, untiled and tiled.

Random weights with the real shapes (from the official key listing) unless --vae names a real file; with a
real file it also reports the reconstruction PSNR of a smooth synthetic clip and the tiled/untiled difference.

    python bench/vae.py --frames 81 --height 720 --width 1280 --tile 256 --overlap 64 [--vae Wan2.1_VAE.pth]
"""
import argparse
import math
import time

import torch

from _common import add_clip_size_args, import_pack, random_vae_state_dict, write_result


def smooth_clip(frames: int, height: int, width: int, device) -> torch.Tensor:
    """Moving colour gradients: content a trained VAE reconstructs well (PSNR well above 30 dB)."""
    t = torch.linspace(0, 1, frames, device=device).view(frames, 1, 1)
    y = torch.linspace(0, 1, height, device=device).view(1, height, 1)
    x = torch.linspace(0, 1, width, device=device).view(1, 1, width)
    channels = [torch.sin(2 * math.pi * (x * (1 + c) + y * (2 - c) + t * 0.3 * (c + 1))) for c in range(3)]
    return 0.8 * torch.stack(channels)[None]


def main():
    p = argparse.ArgumentParser()
    add_clip_size_args(p, height=720, width=1280)
    p.add_argument("--tile", type=int, default=256)
    p.add_argument("--overlap", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--vae", default=None, help="a real Wan 2.1 VAE file (else random weights)")
    p.add_argument("--device", default="cuda", help="cpu: a quick dry run of the script itself")
    args = p.parse_args()
    import_pack()
    from wantalk.wanvideo.vae import WanVAE, load_wan_vae

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cuda = device.type == "cuda"
    if args.vae:
        vae = load_wan_vae(args.vae, device=device, dtype=dtype)
    else:
        vae = WanVAE.from_state_dict(random_vae_state_dict(device), device=device, dtype=dtype)
    video = smooth_clip(args.frames, args.height, args.width, device)
    result = {"bench": "vae", "weights": args.vae or "random", "dtype": args.dtype, "frames": args.frames,
              "size": f"{args.height}x{args.width}", "tile": args.tile, "overlap": args.overlap}
    outputs = {}
    for name, tiling in (("untiled", {}), ("tiled", {"tile_size": args.tile, "tile_overlap": args.overlap})):
        for op in ("encode", "decode"):
            source = video if op == "encode" else outputs["encode_untiled"]
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            try:
                outputs[f"{op}_{name}"] = getattr(vae, op)(source, **tiling)
            except torch.OutOfMemoryError:
                result[f"{op}_{name}_s"] = "out of memory"
                if op == "encode" and name == "untiled":  # the decode runs still need latents
                    outputs["encode_untiled"] = vae.encode(video, tile_size=args.tile, tile_overlap=args.overlap)
                continue
            if cuda:
                torch.cuda.synchronize()
                result[f"{op}_{name}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            result[f"{op}_{name}_s"] = time.perf_counter() - start

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item() if a is not None and b is not None else None

    result["tiled_vs_untiled_latents"] = rel(outputs.get("encode_tiled"), outputs.get("encode_untiled"))
    result["tiled_vs_untiled_video"] = rel(outputs.get("decode_tiled"), outputs.get("decode_untiled"))
    for name in ("untiled", "tiled") if args.vae else ():
        decoded = outputs.get(f"decode_{name}")
        if decoded is not None:
            mse = ((decoded - video) ** 2).mean().item()
            result[f"psnr_{name}_db"] = 10 * math.log10(4 / max(mse, 1e-12))  # range [-1, 1]
    result.update(device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
                  date=time.strftime("%Y-%m-%d"))
    write_result("vae", result)


if __name__ == "__main__":
    main()
