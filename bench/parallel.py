"""Multi-GPU sampling: seconds per denoising step (3 guidance passes, InfiniteTalk) on 1 GPU and on each layout of
the given GPUs, in one run, and how far each layout's latent lands from the one-GPU latent.

Every configuration runs in the pack's worker processes (the one-GPU baseline too, so all pay the same message
costs). The model file is Wan 2.1 I2V 14B + InfiniteTalk with random weights of a realistic scale, real key names,
written once (bf16, ~33 GB) and loaded by every worker with `--quantization`. Audio and text conditioning are random
tensors of the real shapes.

    python bench/parallel.py --gpus 0,1 --layouts 1x1,2x1,1x2            # H200 x2 (guidance x sequence)
    python bench/parallel.py --gpus 0,1,2,3 --layouts 1x1,1x4,2x2
    python bench/parallel.py --gpus 0,1,2,3,4,5,6,7 --layouts 1x1,1x8
    python bench/parallel.py --tiny --gpus cpu,cpu,cpu --layouts 1x1,1x3,3x1   # CPU, gloo: the script works
"""
import argparse
import os
import time

import torch

from _common import add_clip_size_args, import_pack, write_result
from load_14b import write_random_checkpoint

TINY_HEADS = 6


def model_shapes(tiny: bool) -> tuple[dict, dict]:
    """Key -> shape of Wan I2V 14B + InfiniteTalk (or a tiny one with 6 heads), and config overrides."""
    from wantalk.multitalk.model_addon import InfiniteTalkConfig, infinitetalk_addon
    from wantalk.wanvideo.loader import build_model
    from wantalk.wanvideo.modules.model import WAN_I2V_14B
    cfg, acfg, overrides = WAN_I2V_14B, InfiniteTalkConfig(), {}
    if tiny:
        cfg = cfg.with_(dim=192, ffn_dim=256, num_heads=TINY_HEADS, num_layers=2, text_dim=64, clip_dim=32)
        acfg = InfiniteTalkConfig(audio_layers=2, audio_channels=16, intermediate_dim=32, output_dim=32,
                                  context_tokens=4)
        overrides = {"num_heads": TINY_HEADS}
    with torch.device("meta"):
        model = build_model(cfg.with_(audio=acfg), infinitetalk_addon(acfg), device="meta", dtype=torch.bfloat16)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}, overrides


def random_inputs(cfg, acfg, frames: int, height: int, width: int, seed: int):
    from wantalk.multitalk.conditioning import AudioConditioning
    from wantalk.wanvideo.sampling import Conditioning
    g = torch.Generator().manual_seed(seed)
    f, h, w = (frames - 1) // 4 + 1, height // 8, width // 8
    randn = lambda *shape: torch.randn(*shape, generator=g)
    audio = lambda: AudioConditioning(randn(1, f, acfg.context_tokens, acfg.output_dim), 1)
    cond = Conditioning(randn(1, cfg.text_len, cfg.text_dim), randn(1, cfg.text_len, cfg.text_dim),
                        randn(1, 257, cfg.clip_dim), randn(1, 20, f, h, w), audio=audio(), audio_null=audio())
    return cond, randn(1, 16, f, h, w)


def run_layout(pack, layout, recipe, cond, noise, steps: int, shift: float):
    """(seconds per step after the first, final latent) of `steps` InfiniteTalk steps (3 passes each)."""
    from wantalk.wanvideo.parallel.hosting import ParallelModel
    from wantalk.wanvideo.sampling import Guidance, denoise
    from wantalk.wanvideo.schedulers import make_scheduler
    pack.configure(layout, recipe)
    pack.ensure_ready()
    stamps = []
    with torch.no_grad():
        latent = denoise(ParallelModel(None, lambda: pack), noise, make_scheduler("euler", steps, shift), cond,
                         Guidance("infinitetalk", text_scale=5.0, audio_scale=4.0),
                         on_step=lambda i, _lat: stamps.append(time.perf_counter()))
    per_step = [b - a for a, b in zip(stamps, stamps[1:])]
    return sum(per_step) / len(per_step), latent


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--gpus", default="0,1", help="comma-separated CUDA indices, or cpu entries (gloo)")
    p.add_argument("--layouts", default="1x1,1x2,2x1", help="guidance x sequence per run; 1x1 is the baseline")
    add_clip_size_args(p)
    p.add_argument("--steps", type=int, default=4, help="timed steps + 1 (the first is not timed)")
    p.add_argument("--quantization", default="fp8_e4m3fn_scaled")
    p.add_argument("--attention_mode", default="auto")
    p.add_argument("--path", default=os.path.join(os.environ.get("WANTALK_BENCH_DIR", "/tmp"),
                                                  "wan14b_infinitetalk_random_bf16.safetensors"))
    p.add_argument("--tiny", action="store_true", help="a tiny model at a tiny size, float32 (CPU check)")
    args = p.parse_args()
    import_pack()
    from wantalk.multitalk.model_addon import InfiniteTalkConfig
    from wantalk.wanvideo.modules.model import WAN_I2V_14B
    from wantalk.wanvideo.parallel.layout import Layout
    from wantalk.wanvideo.parallel.pack import WorkerPack

    devices = [d.strip() if d.strip() == "cpu" else f"cuda:{d.strip()}" for d in args.gpus.split(",")]
    layouts = [Layout(*map(int, item.split("x"))) for item in args.layouts.split(",")]
    if args.tiny:
        args.path = args.path.replace(".safetensors", "_tiny.safetensors")
        args.frames, args.height, args.width, args.quantization = 9, 48, 80, "disabled"
    shapes, overrides = model_shapes(args.tiny)
    if not os.path.exists(args.path):
        dtype = torch.float32 if args.tiny else torch.bfloat16
        write_random_checkpoint(args.path, shapes, dtype, "cuda" if torch.cuda.is_available() else "cpu")
    recipe = dict(path=args.path, base_dtype="float32" if args.tiny else "bfloat16", quantization=args.quantization,
                  attention_mode=args.attention_mode, params_to_keep=None, extra_weights=(),
                  config_overrides=overrides, loras=())
    cfg, acfg = WAN_I2V_14B, InfiniteTalkConfig()
    if args.tiny:
        cfg = cfg.with_(text_dim=64, clip_dim=32)
        acfg = InfiniteTalkConfig(output_dim=32, context_tokens=4)
    cond, noise = random_inputs(cfg, acfg, args.frames, args.height, args.width, seed=0)
    baseline = None
    for layout in layouts:
        pack = WorkerPack(devices[:layout.world])
        try:
            per_step, latent = run_layout(pack, layout, recipe, cond, noise, args.steps, 5.0)
        finally:
            pack.stop()
        if baseline is None:
            baseline = (layout, per_step, latent)
        base_layout, base_step, base_latent = baseline
        result = {"bench": "parallel", "layout": f"{layout.guidance}x{layout.sequence}", "gpus": layout.world,
                  "devices": devices[:layout.world], "seconds_per_step": round(per_step, 4),
                  "speedup_vs_" + f"{base_layout.guidance}x{base_layout.sequence}": round(base_step / per_step, 3),
                  "efficiency": round(base_step / per_step / (layout.world / base_layout.world), 3),
                  "latent_rel_err_vs_baseline": float((latent - base_latent).abs().max() / base_latent.abs().max()),
                  "frames": args.frames, "height": args.height, "width": args.width, "passes": 3,
                  "quantization": args.quantization, "attention_mode": args.attention_mode, "tiny": args.tiny,
                  "torch": torch.__version__,
                  "device": torch.cuda.get_device_name(0) if devices[0].startswith("cuda") else "cpu",
                  "date": time.strftime("%Y-%m-%d")}
        write_result("parallel", result)


if __name__ == "__main__":
    main()
