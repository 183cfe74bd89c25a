"""HuMo's audio projection: one 8-frame window of Whisper bands per latent frame -> 16 audio tokens.

docs/NOTES.md §4.1 (HuMo audio_proj.py): flatten the window (8 x 5 bands x 1280) -> relu(Linear 512) ->
relu(Linear 512) -> Linear 16*1536 -> tokens -> LayerNorm(1536). Each layer sits in a `.layer` child, as in the
official `DummyAdapterLayer`, so the checkpoint keys load as they are.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..wanvideo.modules.fused_ops import layer_norm_modulate
from ..wanvideo.modules import cast_ops


class _Slot(nn.Module):
    """Holds one layer under the name `layer` (the official key layout); never called itself."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer


class HumoAudioProj(nn.Module):
    def __init__(self, acfg, *, device=None, dtype=None, operations=cast_ops):
        super().__init__()
        self.context_tokens, self.output_dim = acfg.context_tokens, acfg.output_dim
        lin = lambda i, o: _Slot(operations.Linear(i, o, device=device, dtype=dtype))
        self.audio_proj_glob_1 = lin(acfg.features_per_frame, acfg.intermediate_dim)
        self.audio_proj_glob_2 = lin(acfg.intermediate_dim, acfg.intermediate_dim)
        self.audio_proj_glob_3 = lin(acfg.intermediate_dim, acfg.context_tokens * acfg.output_dim)
        self.audio_proj_glob_norm = _Slot(operations.LayerNorm(acfg.output_dim, device=device, dtype=dtype))

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        """windows `[B, F, 8, bands, C]` -> float32 tokens `[B, F, 16, output_dim]` (LayerNorm in float32)."""
        h = torch.relu(self.audio_proj_glob_1.layer(windows.flatten(2)))
        h = torch.relu(self.audio_proj_glob_2.layer(h))
        tokens = self.audio_proj_glob_3.layer(h).unflatten(-1, (self.context_tokens, self.output_dim))
        norm = self.audio_proj_glob_norm.layer
        return layer_norm_modulate(tokens, norm.eps, norm.weight, norm.bias)
