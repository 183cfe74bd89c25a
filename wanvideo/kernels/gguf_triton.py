"""Triton dequantization of GGUF blocks (placeholder until the kernels land)."""
from __future__ import annotations

import torch


def supports(qtype: str, device: torch.device) -> bool:
    return False
