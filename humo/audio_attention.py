"""HuMo's per-block audio cross-attention (`audio_cross_attn_wrapper`, docs/NOTES.md §4.1).

After the text cross-attention and before the FFN, un-gated: `x = x + o(attn(q, k, v))` with
`q = norm_q(q(norm1_audio(x)))` and `k = norm_k(k(audio))`, `v = v(audio)`. Each latent frame's h*w video tokens
attend only to that frame's 16 audio tokens; no RoPE, no mask. The reference latent frames at the end of the
sequence get the tokens of zero audio windows, like any other frame.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..wanvideo.modules.attention import attention
from ..wanvideo.modules.frame_attention import frame_attention
from ..wanvideo.modules.fused_ops import layer_norm_modulate
from ..wanvideo.modules import cast_ops
from ..wanvideo.modules.model import QKNormAttention


class HumoAudioCrossAttention(QKNormAttention):
    """`audio_cross_attn`: q/o over the model dim, k/v from the audio token dim (`kv_dim`), RMSNorm on q and k."""

    def forward(self, x: torch.Tensor, audio_tokens: torch.Tensor, grid, shard=None) -> torch.Tensor:
        """x `[B, F*h*w, dim]` (normalised; a `shard`'s token slice under sequence parallelism), audio_tokens
        `[B, F, N_a, audio_dim]` -> x's shape."""
        b = x.shape[0]
        heads = lambda t: t.reshape(b, -1, self.num_heads, self.head_dim)
        q = heads(self.norm_q(self.q(x)))
        k = heads(self.norm_k(self.k(audio_tokens)))
        v = heads(self.v(audio_tokens))
        attend = lambda q, k, v: attention(q, k.to(q.dtype), v.to(q.dtype))
        return self.o(frame_attention(attend, q, k, v, grid, shard).flatten(2))


class AudioCrossAttentionWrapper(nn.Module):
    """`audio_cross_attn_wrapper`: the input LayerNorm (affine) and the attention, under the official names."""

    def __init__(self, cfg, *, device=None, dtype=None, operations=cast_ops):
        super().__init__()
        self.audio_cross_attn = HumoAudioCrossAttention(cfg.dim, cfg.num_heads, cfg.eps, device=device, dtype=dtype,
                                                        operations=operations, kv_dim=cfg.audio.output_dim)
        self.norm1_audio = operations.LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=True,
                                                device=device, dtype=dtype)


class HumoBlockAdapter(nn.Module):
    """The per-block add-on: its child `audio_cross_attn_wrapper` is registered into each Wan block;
    `forward_in_block` returns the residual to add after the text cross-attention (`input_in_block` and
    `forward_normed`: the same split as multitalk's adapter, so the block fuses the LayerNorm with its residual add)."""

    def __init__(self, cfg, *, device=None, dtype=None, operations=cast_ops):
        super().__init__()
        self.audio_cross_attn_wrapper = AudioCrossAttentionWrapper(cfg, device=device, dtype=dtype,
                                                                   operations=operations)

    @staticmethod
    def input_in_block(block: nn.Module) -> tuple[nn.Module, tuple[nn.Module, ...]]:
        """(the stage's input LayerNorm, the linear layers its output feeds), as the block holds them now."""
        wrapper = block.audio_cross_attn_wrapper
        return wrapper.norm1_audio, (wrapper.audio_cross_attn.q,)

    @staticmethod
    def forward_in_block(block: nn.Module, x: torch.Tensor, inp, keep_qk=None) -> torch.Tensor:
        norm, (q,) = HumoBlockAdapter.input_in_block(block)
        xn = layer_norm_modulate(x, norm.eps, norm.weight, norm.bias, out_dtype=q.compute_dtype)
        return HumoBlockAdapter.forward_normed(block, xn, inp)

    @staticmethod
    def forward_normed(block: nn.Module, x, inp, keep_qk=None) -> torch.Tensor:
        """The stage after its LayerNorm: x is `norm1_audio(x)` in the compute dtype, or its `FP8Rows`."""
        # Modules are taken from the block: quantization or offloading may have swapped them there.
        tokens = inp.audio.tokens_for(x.shape[0], inp.grid).to(x.device)
        return block.audio_cross_attn_wrapper.audio_cross_attn(x, tokens, inp.grid, getattr(inp, "shard", None))
