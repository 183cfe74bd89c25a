"""Tiny models with the real key names, for tests and for placing in ComfyUI's model folders."""
from __future__ import annotations

import os

import torch
from safetensors.torch import save_file

from wantalk.wanvideo.modules.model import WanConfig, WanModel

TINY_I2V = WanConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, in_dim=36, text_dim=64, clip_dim=32)
TINY_T2V = TINY_I2V.with_(in_dim=16, image_branch=False)


def random_state_dict(model: torch.nn.Module, generator: torch.Generator | None = None, scale: float = 1.0) -> dict:
    """Random weights of a realistic scale: fan-in scaled linears, norms near 1."""
    sd = {}
    for name, p in model.state_dict().items():
        if p.dim() >= 2:
            fan_in = p[0].numel()
            sd[name] = torch.randn(p.shape, generator=generator) * (scale / fan_in ** 0.5)
        elif "norm" in name and name.endswith("weight"):
            sd[name] = 1 + 0.1 * torch.randn(p.shape, generator=generator)
        else:
            sd[name] = 0.1 * torch.randn(p.shape, generator=generator)
    return sd


def tiny_wan(cfg: WanConfig = TINY_I2V, generator=None, dtype=torch.float32, **kwargs) -> tuple[WanModel, dict]:
    model = WanModel(cfg, device="cpu", dtype=dtype, **kwargs)
    sd = random_state_dict(model, generator)
    model.load_state_dict(sd)
    return model.eval().requires_grad_(False), sd


def save_state_dict(sd: dict, path: str, prefix: str = "", dtype=None) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_file({prefix + k: (v.to(dtype) if dtype is not None else v).contiguous() for k, v in sd.items()}, path)
    return path


# ---- InfiniteTalk, VAE ------------------------------------------------------------------------------------

def tiny_infinitetalk_config():
    from wantalk.multitalk.model_addon import InfiniteTalkConfig
    return InfiniteTalkConfig(audio_layers=2, audio_channels=16, intermediate_dim=32, output_dim=32, context_tokens=4)


def tiny_infinitetalk(generator=None, dtype=torch.float32) -> tuple[WanModel, dict]:
    """Tiny Wan I2V + InfiniteTalk with the real key names (audio features: 2 layers x 16 channels)."""
    from wantalk.wanvideo.loader import build_model
    from wantalk.multitalk.model_addon import infinitetalk_addon
    config = tiny_infinitetalk_config()
    model = build_model(TINY_I2V.with_(audio=config), infinitetalk_addon(config), device="cpu", dtype=dtype)
    sd = random_state_dict(model, generator)
    model.load_state_dict(sd)
    return model.eval().requires_grad_(False), sd


def tiny_vae(generator=None, dim: int = 8):
    from wantalk.wanvideo.vae import WanVAE, WanVAEConfig
    vae = WanVAE(WanVAEConfig(dim=dim))
    sd = random_state_dict(vae, generator)
    vae.load_state_dict(sd)
    return vae.eval().requires_grad_(False), sd
