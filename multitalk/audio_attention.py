"""Per-block audio cross-attention of InfiniteTalk / MultiTalk (docs/NOTES.md §3.3).

Each latent frame's h*w video tokens attend to that frame's own audio tokens (32 per speaker); no gate.
With two speakers, every video token gets a 1-D RoPE position from the speaker it looks at in the first
latent frame (the reference attention map of the block's self-attention), and each speaker's audio keys get
a position inside that speaker's range, so tokens of speaker 1 mostly hear audio of speaker 1.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..wanvideo.modules.attention import attention, attention_policy
from ..wanvideo.modules.frame_attention import frame_attention
from ..wanvideo.modules.fused_ops import layer_norm_modulate, rope_reference
from ..wanvideo.modules import cast_ops

ROPE_1D_THETA = 10000


ROPE_1D_CHUNK = 4096  # tokens rotated at a time: float32 temporaries stay small at 32760 tokens x 5120


def rope_1d(x: torch.Tensor, positions: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """1-D RoPE on adjacent pairs of `x` `[B, L, H, D]` at float `positions` `[B, L]`, in `out_dtype` (float32
    by default), rotated in float32 a chunk of tokens at a time so the two-speaker path needs little memory.

    Angles are float32 products, as the official RotaryPositionalEmbedding1D computes them."""
    b, l, _, d = x.shape
    inv_freq = 1.0 / (ROPE_1D_THETA ** (torch.arange(0, d, 2, dtype=torch.float32, device=x.device) / d))
    positions = positions.to(device=x.device, dtype=torch.float32)
    out = torch.empty(x.shape, device=x.device, dtype=out_dtype or torch.float32)
    for i in range(b):
        for s in range(0, l, ROPE_1D_CHUNK):
            angles = positions[i, s:s + ROPE_1D_CHUNK, None] * inv_freq
            cos, sin = torch.cos(angles)[:, None, :], torch.sin(angles)[:, None, :]
            out[i:i + 1, s:s + ROPE_1D_CHUNK] = rope_reference(x[i:i + 1, s:s + ROPE_1D_CHUNK], cos, sin)
    return out


def reference_attention_map(q: torch.Tensor, k: torch.Tensor, frame_tokens: int, masks: torch.Tensor,
                            dtype: torch.dtype, head_groups: int = 2) -> torch.Tensor:
    """How much each video token attends to each class region (speaker 1, speaker 2, background) of the
    first latent frame: `[B, classes, L]` in `dtype`.

    Per head: softmax(q k_ref^T / sqrt(D)) over the first frame's tokens, summed over a class mask and divided
    by its size; averaged over the heads of each of `head_groups` equal groups, then over the groups (heads
    past `head_groups * (H // head_groups)` are left out, as in the official code). The masked sums are one
    fused attention with the masks as values, so the `[L, h*w]` map is never materialised.
    """
    b, _, heads, d = q.shape
    classes = masks.shape[0]
    if classes > d:
        raise ValueError(f"at most {d} class masks are supported, got {classes}")
    values = torch.zeros(b, frame_tokens, heads, d, device=q.device, dtype=dtype)
    values[..., :classes] = masks.t().to(device=q.device, dtype=dtype)[None, :, None, :]
    out = attention(q.to(dtype), k[:, :frame_tokens].to(dtype), values,
                    policy=attention_policy().exact())[..., :classes].float()
    per_group = heads // head_groups
    groups = out[:, :, :per_group * head_groups].unflatten(2, (head_groups, per_group))
    mean = groups.mean(dim=3).mean(dim=2)  # [B, L, classes]
    sizes = masks.sum(dim=1).float().to(mean.device)
    # An empty class (only the background can be) wins every token, as the official 0/0 = NaN does in argmax.
    amap = torch.where(sizes > 0, mean / sizes.clamp(min=1), torch.inf)
    return amap.transpose(1, 2).to(dtype)


def speaker_positions(amap: torch.Tensor, speaker_ranges, background: float, extrema=None) -> torch.Tensor:
    """1-D RoPE position of every video token `[B, L]` from the map `[B, 3, L]`: each speaker's map row is
    rescaled from its (min, max) to that speaker's range; a token takes the value of its argmax class.
    `extrema(row)` gives (min, max) `[B, 1]` over all tokens when the map holds one rank's slice only.

    The arithmetic runs in the map's dtype, as the official code does (bf16 positions in practice)."""
    rows = []
    for c, (start, stop) in enumerate(speaker_ranges):
        row = amap[:, c]
        lo, hi = (row.amin(dim=1, keepdim=True), row.amax(dim=1, keepdim=True)) if extrema is None else extrema(row)
        rows.append((row - lo) / (hi - lo + 1e-8) * (stop - start) + start)
    rows.append(torch.full_like(amap[:, 0], background))
    return torch.stack(rows, dim=1).gather(1, amap.argmax(dim=1, keepdim=True))[:, 0]


def audio_key_positions(tokens_per_frame: int, frames: int, speaker_ranges, device=None) -> torch.Tensor:
    """1-D RoPE position of every audio key `[frames * tokens_per_frame]`: the first half of each frame's
    tokens (speaker 1) sits at the centre of speaker 1's range, the second half at the centre of speaker 2's."""
    (a0, a1), (b0, b1) = speaker_ranges
    per_frame = torch.full((tokens_per_frame,), (b0 + b1) / 2, device=device)
    per_frame[:tokens_per_frame // 2] = (a0 + a1) / 2
    return per_frame.repeat(frames)


class AudioCrossAttention(nn.Module):
    """`audio_cross_attn`: q from video tokens, k/v from audio tokens (`kv_linear` rows: k then v), `proj`."""

    def __init__(self, dim: int, audio_dim: int, num_heads: int, *, device, dtype, operations):
        super().__init__()
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.q_linear = operations.Linear(dim, dim, device=device, dtype=dtype)
        self.kv_linear = operations.Linear(audio_dim, 2 * dim, device=device, dtype=dtype)
        self.proj = operations.Linear(dim, dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, audio_tokens: torch.Tensor, grid, q_positions=None, k_positions=None,
                shard=None):
        """x `[B, F*h*w, dim]` (a `shard`'s token slice under sequence parallelism), audio_tokens
        `[B, F, N_a, audio_dim]`, positions `[B, F*h*w]` / `[B, F*N_a]` (two speakers only) -> x's shape in the
        compute dtype."""
        b = x.shape[0]
        f = grid[0]
        n_a = audio_tokens.shape[2]
        q = self.q_linear(x).view(b, x.shape[1], self.num_heads, self.head_dim)
        k, v = self.kv_linear(audio_tokens).view(b, f * n_a, 2, self.num_heads, self.head_dim).unbind(2)
        if q_positions is not None:
            q = rope_1d(q, q_positions, q.dtype)
            k = rope_1d(k, k_positions, k.dtype)
        out = frame_attention(attention, q, k, v, grid, shard)
        return self.proj(out.flatten(2))


class InfiniteTalkBlockAdapter(nn.Module):
    """The per-block add-on: its children (`audio_cross_attn`, `norm_x`) are registered into each Wan block;
    `forward_in_block` runs after the text cross-attention and returns the residual to add. The block fuses that
    stage's LayerNorm with its preceding residual add: `input_in_block` names the norm and the layers fed by it,
    `forward_normed` runs the rest on the normalised input."""

    def __init__(self, cfg, *, device=None, dtype=None, operations=cast_ops):
        super().__init__()
        acfg = cfg.audio
        self.audio_cross_attn = AudioCrossAttention(cfg.dim, acfg.output_dim, cfg.num_heads,
                                                    device=device, dtype=dtype, operations=operations)
        self.norm_x = operations.LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=True, device=device, dtype=dtype)
        self.acfg = acfg

    @staticmethod
    def input_in_block(block: nn.Module) -> tuple[nn.Module, tuple[nn.Module, ...]]:
        """(the stage's input LayerNorm, the linear layers its output feeds), as the block holds them now."""
        return block.norm_x, (block.audio_cross_attn.q_linear,)

    def forward_in_block(self, block: nn.Module, x: torch.Tensor, inp, keep_qk) -> torch.Tensor:
        norm, (q_linear,) = self.input_in_block(block)
        xn = layer_norm_modulate(x, norm.eps, norm.weight, norm.bias, out_dtype=q_linear.compute_dtype)
        return self.forward_normed(block, xn, inp, keep_qk)

    def forward_normed(self, block: nn.Module, x, inp, keep_qk) -> torch.Tensor:
        """The stage after its LayerNorm: x is `norm_x(x)` in the compute dtype, or its `FP8Rows`."""
        # Modules are taken from the block: quantization or offloading may have swapped them there.
        cond, attn = inp.audio, block.audio_cross_attn
        shard = getattr(inp, "shard", None)  # sequence parallelism: x is this rank's token slice
        tokens = cond.tokens_for(x.shape[0], inp.grid).to(x.device)  # audio_proj may live elsewhere (offload)
        q_pos = k_pos = None
        if cond.needs_qk:
            if not keep_qk:
                raise RuntimeError("two-speaker audio needs the self-attention q/k of the block (keep_qk)")
            f, h, w = inp.grid
            amap = reference_attention_map(keep_qk[0], keep_qk[1], h * w, cond.token_masks(inp.grid),
                                           attn.q_linear.compute_dtype)
            q_pos = speaker_positions(amap, self.acfg.speaker_ranges, self.acfg.background_position,
                                      None if shard is None else shard.extrema)
            k_pos = audio_key_positions(tokens.shape[2], f, self.acfg.speaker_ranges, x.device).expand(x.shape[0], -1)
        return attn(x, tokens, inp.grid, q_pos, k_pos, shard)
