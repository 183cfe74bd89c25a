"""Wan 2.1 diffusion transformer (T2V and I2V), following the official WanModel numerics.

Precision contract (docs/NOTES.md §1.1-1.2): the time embedding, modulation, gated residual adds and the
head run in float32; the residual stream is float32; linear layers compute in their own dtype; RoPE
angles come from float64 tables; attention runs in the model's compute dtype.

Modules take `device`, `dtype` and `operations` (a namespace with `Linear`, `Conv3d`, `LayerNorm`)
explicitly. Quantization swaps `Linear` modules afterwards, in one place (`wanvideo.quantization`).
Audio add-ons (InfiniteTalk, HuMo) plug into each block through `block.audio_adapter`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
import torch.nn as nn

from ...fp8_optimization import wants_fp8_rows
from . import cast_ops
from .attention import AUTO, AttentionPolicy, attention, policy_of, use_attention_policy
from .fused_ops import (PendingResidual, add_fp8_rows, gelu_tanh_fp8_rows, layer_norm_modulate, residual_add,
                        residual_layer_norm_modulate, residual_parts, rms_norm_reference, rms_norm_rope)


@dataclass(frozen=True)
class WanConfig:
    dim: int = 5120
    ffn_dim: int = 13824
    num_heads: int = 40
    num_layers: int = 40
    in_dim: int = 36
    out_dim: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    text_len: int = 512
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    image_branch: bool = True   # I2V CLIP cross-attention (k_img/v_img, img_emb)
    clip_dim: int = 1280
    audio: Any = None           # add-on config (multitalk.InfiniteTalkConfig / humo.HumoConfig) or None

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def model_type(self) -> str:
        return "i2v" if self.in_dim != self.out_dim else "t2v"

    def with_(self, **kw) -> "WanConfig":
        return replace(self, **kw)


WAN_I2V_14B = WanConfig()
WAN_T2V_1_3B = WanConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, in_dim=16, image_branch=False)


# ----------------------------------------------------------------------------------------------
# Embeddings and RoPE
# ----------------------------------------------------------------------------------------------

def sinusoidal_embedding_1d(dim: int, t: torch.Tensor) -> torch.Tensor:
    """`[cos(t*f), sin(t*f)]` with f_k = 10000^(-k/half), computed in float64, returned as float32."""
    half = dim // 2
    t = t.to(torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device).div(half))
    args = torch.outer(t, freqs)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1).float()


def rope_inv_freqs(head_dim: int) -> list[torch.Tensor]:
    """float64 inverse frequencies of the (time, height, width) RoPE parts, split 22/21/21 at d=128."""
    half = head_dim // 2
    parts = [half - 2 * (half // 3), half // 3, half // 3]
    out = []
    for n in parts:
        d = 2 * n
        out.append(1.0 / torch.pow(10000.0, torch.arange(0, d, 2, dtype=torch.float64) / d))
    return out


def rope_params(max_len: int, dim: int, theta: float = 10000.0) -> torch.Tensor:
    """complex128 `[max_len, dim/2]` table, as the official `rope_params`."""
    inv = 1.0 / torch.pow(theta, torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    return torch.polar(torch.ones(max_len, dim // 2, dtype=torch.float64), torch.outer(torch.arange(max_len, dtype=torch.float64), inv))


def rope_angles(grid: tuple[int, int, int], head_dim: int, device, offsets=(0, 0, 0)) -> torch.Tensor:
    """float64 angle per (token, complex pair): `[F*H*W, head_dim/2]` in row-major (f, h, w) order."""
    f, h, w = grid
    inv_t, inv_h, inv_w = (x.to(device) for x in rope_inv_freqs(head_dim))
    pos = lambda n, off: torch.arange(off, off + n, dtype=torch.float64, device=device)
    at = torch.outer(pos(f, offsets[0]), inv_t)[:, None, None, :].expand(f, h, w, -1)
    ah = torch.outer(pos(h, offsets[1]), inv_h)[None, :, None, :].expand(f, h, w, -1)
    aw = torch.outer(pos(w, offsets[2]), inv_w)[None, None, :, :].expand(f, h, w, -1)
    return torch.cat([at, ah, aw], dim=-1).reshape(f * h * w, -1)


def rope_cos_sin(grid: tuple[int, int, int], head_dim: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 cos/sin tables `[L, 1, head_dim/2]` from float64 angles (computed once per forward)."""
    ang = rope_angles(grid, head_dim, device)
    return torch.cos(ang).float()[:, None, :], torch.sin(ang).float()[:, None, :]


# ----------------------------------------------------------------------------------------------
# Norms
# ----------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """`x * rsqrt(mean(x^2) + eps)` in float32, cast back to x's dtype, then times the weight."""

    def __init__(self, dim: int, eps: float = 1e-6, *, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_reference(x, self.weight, self.eps)

    def heads(self, x: torch.Tensor, num_heads: int, rope=None) -> torch.Tensor:
        """Normalised (and optionally rotated) `[B, L, H, D]` in x's dtype, fused on CUDA."""
        return rms_norm_rope(x, self.weight, self.eps, num_heads, x.dtype, rope)


# ----------------------------------------------------------------------------------------------
# Attention modules
# ----------------------------------------------------------------------------------------------

class QKNormAttention(nn.Module):
    """q, k, v, o projections with RMSNorm on q and k over the full dim: the layout of every Wan attention
    (and HuMo's audio attention, whose k/v project from `kv_dim`)."""

    def __init__(self, dim: int, num_heads: int, eps: float, *, device, dtype, operations, kv_dim: int | None = None):
        super().__init__()
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        kv_dim = kv_dim or dim
        self.q = operations.Linear(dim, dim, device=device, dtype=dtype)
        self.k = operations.Linear(kv_dim, dim, device=device, dtype=dtype)
        self.v = operations.Linear(kv_dim, dim, device=device, dtype=dtype)
        self.o = operations.Linear(dim, dim, device=device, dtype=dtype)
        self.norm_q = RMSNorm(dim, eps, device=device, dtype=dtype)
        self.norm_k = RMSNorm(dim, eps, device=device, dtype=dtype)


class WanSelfAttention(QKNormAttention):
    def qkv(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        """q and k after RMSNorm and RoPE, and v: all `[B, L, H, D]` in the compute dtype."""
        b, s, _ = x.shape
        q = self.norm_q.heads(self.q(x), self.num_heads, rope)
        k = self.norm_k.heads(self.k(x), self.num_heads, rope)
        v = self.v(x).view(b, s, self.num_heads, self.head_dim)
        return q, k, v

    def forward(self, x, rope, k_lens=None, keep_qk: list | None = None, shard=None):
        q, k, v = self.qkv(x, rope)
        if keep_qk is not None:
            keep_qk.extend([q, k if shard is None else shard.reference_keys(k)])
        if shard is not None:  # sequence parallel: x is this rank's token slice (wanvideo.parallel.sequence)
            attend = lambda q, k, v: attention(q, k, v, k_lens=k_lens)
            return self.o(shard.self_attention(attend, q, k, v).flatten(2))
        out = attention(q, k.to(q.dtype), v.to(q.dtype), k_lens=k_lens)
        return self.o(out.flatten(2))


class WanCrossAttention(QKNormAttention):
    """Text cross-attention, plus the I2V CLIP-image branch (`k_img`, `v_img`) when `image_branch`."""

    def __init__(self, dim: int, num_heads: int, eps: float, image_branch: bool, *, device, dtype, operations):
        super().__init__(dim, num_heads, eps, device=device, dtype=dtype, operations=operations)
        self.image_branch = image_branch
        if image_branch:
            self.k_img = operations.Linear(dim, dim, device=device, dtype=dtype)
            self.v_img = operations.Linear(dim, dim, device=device, dtype=dtype)
            self.norm_k_img = RMSNorm(dim, eps, device=device, dtype=dtype)

    def forward(self, x, context, text_len: int):
        b = x.shape[0]
        heads = lambda t: t.view(b, -1, self.num_heads, self.head_dim)
        q = self.norm_q.heads(self.q(x), self.num_heads)
        txt = context[:, -text_len:]
        k = self.norm_k.heads(self.k(txt), self.num_heads)
        v = heads(self.v(txt))
        out = attention(q, k.to(q.dtype), v.to(q.dtype))
        if self.image_branch and context.shape[1] > text_len:
            img = context[:, :-text_len]
            k_img = self.norm_k_img.heads(self.k_img(img), self.num_heads)
            v_img = heads(self.v_img(img))
            out_img = attention(q, k_img.to(q.dtype), v_img.to(q.dtype))
            if wants_fp8_rows([self.o], out.device, out.dtype):  # `o` takes its rows from the pass that adds
                return self.o(add_fp8_rows(out.flatten(2), out_img.flatten(2)))
            out = out + out_img
        return self.o(out.flatten(2))


# ----------------------------------------------------------------------------------------------
# Blocks, head, image embedding
# ----------------------------------------------------------------------------------------------

class BlockInputs:
    """Per-forward state shared by all blocks (avoids threading a dozen arguments)."""

    def __init__(self, e0, rope, context, grid, seq_lens=None, audio=None, shard=None, chain_residuals=False):
        self.e0, self.rope, self.context, self.grid = e0, rope, context, grid
        self.seq_lens, self.audio = seq_lens, audio
        self.shard = shard  # this rank's token slice under sequence parallelism, else None
        # blocks return `PendingResidual` (their last add is done by the next block's first LayerNorm pass)
        self.chain_residuals = chain_residuals


class WanAttentionBlock(nn.Module):
    def __init__(self, cfg: WanConfig, *, device, dtype, operations, audio_adapter: nn.Module | None = None):
        super().__init__()
        self.dim, self.eps, self.text_len = cfg.dim, cfg.eps, cfg.text_len
        self.self_attn = WanSelfAttention(cfg.dim, cfg.num_heads, cfg.eps, device=device, dtype=dtype, operations=operations)
        self.norm3 = operations.LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=True, device=device, dtype=dtype)
        self.cross_attn = WanCrossAttention(cfg.dim, cfg.num_heads, cfg.eps, cfg.image_branch,
                                            device=device, dtype=dtype, operations=operations)
        self.ffn = nn.Sequential(operations.Linear(cfg.dim, cfg.ffn_dim, device=device, dtype=dtype),
                                 nn.GELU(approximate="tanh"),
                                 operations.Linear(cfg.ffn_dim, cfg.dim, device=device, dtype=dtype))
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim, device=device, dtype=dtype) / cfg.dim ** 0.5)
        if audio_adapter is not None:
            # Registered under the add-on's own key names (e.g. `audio_cross_attn`, `norm_x`).
            for name, module in audio_adapter.named_children():
                self.add_module(name, module)
            self.audio_input = audio_adapter.input_in_block
            self.audio_adapter = audio_adapter.forward_normed
        else:
            self.audio_input = self.audio_adapter = None

    def forward(self, x: torch.Tensor | PendingResidual, inp: BlockInputs) -> torch.Tensor | PendingResidual:
        """x: float32 residual stream `[B, L, dim]` (not modified; a new tensor is returned), or the previous block's
        `PendingResidual`; with `inp.chain_residuals` this block returns one too. Each residual add is fused with
        the LayerNorm that follows it; each norm (and the FFN's GELU) hands its consumers E4M3 rows when they are
        fast FP8 layers (`wants_fp8_rows`), else the compute-dtype tensor."""
        m = (self.modulation.float() + inp.e0).unbind(1)  # shift, scale, gate (msa), shift, scale, gate (mlp)
        x, y, gate = residual_parts(x)
        cd = self.self_attn.q.compute_dtype
        fp8 = lambda *linears: wants_fp8_rows(linears, x.device, cd)
        sa, ca = self.self_attn, self.cross_attn
        with_audio = self.audio_adapter is not None and inp.audio is not None
        keep_qk = [] if with_audio and getattr(inp.audio, "needs_qk", False) else None
        x, xn = residual_layer_norm_modulate(x, y, gate, self.eps, scale=m[1], shift=m[0], out_dtype=cd,
                                             fp8_rows=fp8(sa.q, sa.k, sa.v))
        y = sa(xn, inp.rope, inp.seq_lens, keep_qk, inp.shard)
        x, xn = residual_layer_norm_modulate(x, y, m[2], self.eps, self.norm3.weight, self.norm3.bias,
                                             out_dtype=cd, fp8_rows=fp8(ca.q))
        y = ca(xn, inp.context, self.text_len)
        if with_audio:
            norm, linears = self.audio_input(self)
            acd = linears[0].compute_dtype
            x, xn = residual_layer_norm_modulate(x, y, None, norm.eps, norm.weight, norm.bias, out_dtype=acd,
                                                 fp8_rows=wants_fp8_rows(linears, x.device, acd))
            y = self.audio_adapter(self, xn, inp, keep_qk)
        x, xn = residual_layer_norm_modulate(x, y, None, self.eps, scale=m[4], shift=m[3], out_dtype=cd,
                                             fp8_rows=fp8(self.ffn[0]))
        h = self.ffn[0](xn)
        h = gelu_tanh_fp8_rows(h) if fp8(self.ffn[2]) else self.ffn[1](h)
        y = self.ffn[2](h)
        return PendingResidual(x, y, m[5]) if inp.chain_residuals else residual_add(x, y, m[5])


class Head(nn.Module):
    def __init__(self, dim: int, out_dim: int, patch_size, eps: float, *, device, dtype, operations):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.head = operations.Float32Linear(dim, math.prod(patch_size) * out_dim, device=device, dtype=dtype)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim, device=device, dtype=dtype) / dim ** 0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.modulation.float() + e.float()[:, None]).unbind(1)
        return self.head(layer_norm_modulate(x, self.eps, scale=scale, shift=shift))


class MLPProj(nn.Module):
    """CLIP image tokens (1280) to model dim: LN, Linear, GELU(erf), Linear, LN."""

    def __init__(self, in_dim: int, out_dim: int, *, device, dtype, operations):
        super().__init__()
        self.proj = nn.Sequential(
            operations.LayerNorm(in_dim, device=device, dtype=dtype),
            operations.Linear(in_dim, in_dim, device=device, dtype=dtype),
            nn.GELU(),
            operations.Linear(in_dim, out_dim, device=device, dtype=dtype),
            operations.LayerNorm(out_dim, device=device, dtype=dtype))

    def forward(self, clip_fea: torch.Tensor) -> torch.Tensor:
        p = self.proj
        x = layer_norm_modulate(clip_fea, p[0].eps, p[0].weight, p[0].bias)
        x = p[3](p[2](p[1](x)))
        return layer_norm_modulate(x, p[4].eps, p[4].weight, p[4].bias)


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------

AudioAdapterFactory = Callable[..., nn.Module]


class WanModel(nn.Module):
    """Wan 2.1 DiT. `forward_batched` is the pack's interface; `forward` the official call convention."""

    def __init__(self, cfg: WanConfig, *, device=None, dtype=torch.bfloat16, operations=cast_ops,
                 audio_adapter_factory: AudioAdapterFactory | None = None):
        super().__init__()
        self.cfg = cfg
        self.dtype = dtype
        self.patch_embedding = operations.Conv3d(cfg.in_dim, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size,
                                                 device=device, dtype=dtype)
        self.text_embedding = nn.Sequential(operations.Linear(cfg.text_dim, cfg.dim, device=device, dtype=dtype),
                                            nn.GELU(approximate="tanh"),
                                            operations.Linear(cfg.dim, cfg.dim, device=device, dtype=dtype))
        self.time_embedding = nn.Sequential(operations.Float32Linear(cfg.freq_dim, cfg.dim, device=device, dtype=dtype),
                                            nn.SiLU(),
                                            operations.Float32Linear(cfg.dim, cfg.dim, device=device, dtype=dtype))
        self.time_projection = nn.Sequential(nn.SiLU(), operations.Float32Linear(cfg.dim, cfg.dim * 6, device=device,
                                                                                 dtype=dtype))
        self.blocks = nn.ModuleList([
            WanAttentionBlock(cfg, device=device, dtype=dtype, operations=operations,
                              audio_adapter=(audio_adapter_factory(cfg, device=device, dtype=dtype, operations=operations)
                                             if audio_adapter_factory is not None else None))
            for _ in range(cfg.num_layers)])
        self.head = Head(cfg.dim, cfg.out_dim, cfg.patch_size, cfg.eps, device=device, dtype=dtype, operations=operations)
        if cfg.image_branch:
            self.img_emb = MLPProj(cfg.clip_dim, cfg.dim, device=device, dtype=dtype, operations=operations)
        self.attention_policy = AUTO   # every attention call of a forward follows it (no module holds a mode)
        self.block_runner = None  # optional callable(block_index, block, x, inputs) -> x, e.g. block swap
        self.sequence_parallel = None  # optional wanvideo.parallel.sequence.SequenceParallel (multi-GPU workers)

    # -- configuration -------------------------------------------------------------------------
    def set_attention_mode(self, mode: AttentionPolicy | str) -> None:
        self.attention_policy = policy_of(mode)

    @property
    def attention_mode(self) -> str:
        return self.attention_policy.mode

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.dtype if self.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.bfloat16

    # -- pieces --------------------------------------------------------------------------------
    def embed_time(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(e `[B, dim]`, e0 `[B, 6, dim]`), float32."""
        e = self.time_embedding(sinusoidal_embedding_1d(self.cfg.freq_dim, t))
        e0 = self.time_projection(e).unflatten(1, (6, self.cfg.dim))
        return e, e0

    def embed_text(self, context: torch.Tensor) -> torch.Tensor:
        """`[B, Lt, text_dim]` -> `[B, text_len, dim]`; rows are zero-padded to text_len BEFORE the MLP."""
        b, lt, _ = context.shape
        if lt < self.cfg.text_len:
            context = torch.cat([context, context.new_zeros(b, self.cfg.text_len - lt, context.shape[2])], dim=1)
        elif lt > self.cfg.text_len:
            context = context[:, :self.cfg.text_len]
        te = self.text_embedding
        return te(context)

    def patchify(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        w = self.patch_embedding.weight
        x = self.patch_embedding(x.to(w.dtype if w.dtype.is_floating_point and w.dtype.itemsize >= 2 else self.compute_dtype))
        grid = tuple(x.shape[2:])
        return x.flatten(2).transpose(1, 2).float().contiguous(), grid  # token-major, so the block stages fuse

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """`[B, L, prod(patch)*out]` -> `[B, out, F*p0, H*p1, W*p2]` (channel fastest per token)."""
        f, h, w = grid
        p0, p1, p2 = self.cfg.patch_size
        c = self.cfg.out_dim
        x = x[:, :f * h * w].reshape(x.shape[0], f, h, w, p0, p1, p2, c)
        return torch.einsum("bfhwpqrc->bcfphqwr", x).reshape(x.shape[0], c, f * p0, h * p1, w * p2)

    # -- forward -------------------------------------------------------------------------------
    def forward_batched(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                        clip_fea: torch.Tensor | None = None, y: torch.Tensor | None = None,
                        audio: Any = None, seq_lens: torch.Tensor | None = None,
                        attention_policy: AttentionPolicy | str | None = None) -> torch.Tensor:
        """x `[B, C, F, H, W]`, t `[B]`, context `[B, Lt, text_dim]`, clip_fea `[B, 257, 1280]`,
        y `[B, in_dim - C, F, H, W]` -> float32 `[B, out_dim, F, H, W]`. Every attention call of the forward
        follows `attention_policy` (default: the model's `attention_policy`)."""
        with use_attention_policy(self.attention_policy if attention_policy is None else attention_policy):
            return self._forward_batched(x, t, context, clip_fea, y, audio, seq_lens)

    def _forward_batched(self, x, t, context, clip_fea, y, audio, seq_lens) -> torch.Tensor:
        if y is not None:
            x = torch.cat([x, y.to(x.dtype)], dim=1)
        if x.shape[1] != self.cfg.in_dim:
            raise ValueError(f"WanModel expects {self.cfg.in_dim} input channels (latent + I2V conditioning), "
                             f"got {x.shape[1]}; an I2V model needs the image conditioning `y`.")
        tokens, grid = self.patchify(x)
        e, e0 = self.embed_time(t.to(tokens.device).expand(x.shape[0]))
        ctx = self.embed_text(context.to(self.compute_dtype))
        if self.cfg.image_branch and clip_fea is not None:
            ctx = torch.cat([self.img_emb(clip_fea.to(self.compute_dtype)).to(ctx.dtype), ctx], dim=1)
        rope = rope_cos_sin(grid, self.cfg.head_dim, tokens.device)
        shard = None if self.sequence_parallel is None else self.sequence_parallel.plan(tokens.shape[1], grid)
        if shard is not None:
            tokens, rope, seq_lens = shard.enter(tokens, rope, seq_lens)
        # Blocks chain their last residual add into the next block's first pass when nothing runs between them.
        inputs = BlockInputs(e0, rope, ctx, grid, seq_lens, audio, shard, chain_residuals=self.block_runner is None)
        for i, block in enumerate(self.blocks):
            tokens = block(tokens, inputs) if self.block_runner is None else self.block_runner(i, block, tokens, inputs)
        out = self.head(tokens.resolve() if isinstance(tokens, PendingResidual) else tokens, e)
        return self.unpatchify(out if shard is None else shard.gather(out), grid)

    def forward(self, x, t, context, seq_len=None, clip_fea=None, y=None, **kwargs):
        """Official convention: lists of `[C, F, H, W]` latents and `[L, text_dim]` contexts -> list of outputs."""
        outs = []
        for i, xi in enumerate(x):
            yi = None if y is None else y[i][None]
            ci = None if clip_fea is None else clip_fea[i:i + 1]
            ti = t[i:i + 1] if t.dim() > 0 and t.numel() > 1 else t.reshape(1)
            audio = self.audio_from_official(kwargs, i) if kwargs else None
            outs.append(self.forward_batched(xi[None], ti, context[i][None], ci, yi, audio=audio)[0])
        return outs

    def audio_from_official(self, kwargs: dict, index: int):
        """Hook for add-ons to translate official keyword arguments (InfiniteTalk `audio`, HuMo `audio`)."""
        if self.cfg.audio is None:
            raise TypeError(f"unexpected arguments for a plain Wan model: {sorted(kwargs)}")
        return self.cfg.audio.from_official(self, kwargs, index)
