"""Tiny HuMo-17B-shaped model and Whisper encoder files with the real key names, loadable by the pack's loaders:
for the node tests and for ComfyUI's model folders (the real-ComfyUI workflow test).

The Whisper loader infers heads as d_model // 64 and HuMo needs all 33 hidden states, so the smallest loadable
encoder has 32 layers of 64 channels; the tiny HuMo therefore takes 8 x 5 x 64 audio features per latent frame.
"""
from __future__ import annotations

import os

import torch

from wantalk.humo.model_addon import HumoConfig, humo_addon
from wantalk.humo.whisper import WhisperEncoder, WhisperEncoderConfig
from wantalk.wanvideo.loader import build_model
from tiny_models import TINY_HUMO_FILES, TINY_I2V, random_state_dict, save_state_dict

TINY_WHISPER = WhisperEncoderConfig(n_mels=16, d_model=64, num_layers=32, num_heads=1, ffn_dim=96, num_positions=10)
TINY_GRAPH_HUMO = HumoConfig(audio_channels=64, intermediate_dim=32, output_dim=32, context_tokens=4)


def tiny_whisper(generator=None) -> tuple[WhisperEncoder, dict]:
    model = WhisperEncoder(TINY_WHISPER)
    sd = random_state_dict(model, generator)
    model.load_state_dict(sd)
    return model.eval().requires_grad_(False), sd


def tiny_graph_humo(generator=None, dtype=torch.float32):
    """HuMo-17B shaped (36 input channels, no CLIP branch) at the tiny Wan sizes, audio from TINY_WHISPER."""
    cfg = TINY_I2V.with_(image_branch=False, audio=TINY_GRAPH_HUMO)
    model = build_model(cfg, humo_addon(TINY_GRAPH_HUMO), device="cpu", dtype=dtype)
    sd = random_state_dict(model, generator)
    model.load_state_dict(sd)
    return model.eval().requires_grad_(False), sd


def make_tiny_humo_models(models_dir: str, seed: int = 0) -> dict:
    """Write the tiny HuMo (bf16, ComfyUI's `model.diffusion_model.` prefix) and Whisper (HF `model.encoder.`
    layout) files into ComfyUI's model folders. Returns {folder: file name}."""
    g = torch.Generator().manual_seed(seed)
    path = lambda kind: os.path.join(models_dir, kind, TINY_HUMO_FILES[kind])
    save_state_dict(tiny_graph_humo(g)[1], path("diffusion_models"), prefix="model.diffusion_model.",
                    dtype=torch.bfloat16)
    save_state_dict(tiny_whisper(g)[1], path("audio_encoders"), prefix="model.encoder.")
    return dict(TINY_HUMO_FILES)
