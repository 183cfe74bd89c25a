"""Ulysses sequence parallelism: one forward of the DiT split over the ranks of a process group.

Every rank holds the whole model and an equal contiguous slice of the video tokens (the sequence is padded to a
multiple of the group size; padded keys are masked through the key lengths). Token-wise work (linears, norms,
modulation, FFN, text cross-attention against the replicated context, the head) runs on the slice. Around the
self-attention one all-to-all turns "my tokens, all heads" into "all tokens, my heads" and a second one turns the
output back, so each rank attends over the whole sequence for `heads / size` heads. The per-frame audio attention
(InfiniteTalk, HuMo) runs on the frames the slice touches, each frame with its own audio keys; two speakers need
the first frame's keys (gathered) and the extremes of the reference map over all tokens (reduced).

The same code runs over NCCL on GPUs and gloo on CPU (tests).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist


class SequenceParallel:
    """The process group a model's forward is split over; `plan` gives the per-forward split."""

    def __init__(self, group=None):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def plan(self, length: int, grid: tuple[int, int, int]) -> "SequenceShard":
        return SequenceShard(self, length, grid)


class SequenceShard:
    """This rank's slice `[start, start + valid)` of the `length` tokens of one forward (local length `local`)."""

    def __init__(self, sp: SequenceParallel, length: int, grid: tuple[int, int, int]):
        self.group, self.size, self.rank = sp.group, sp.size, sp.rank
        self.length, self.grid = length, grid
        self.local = math.ceil(length / self.size)
        self.start = self.rank * self.local
        self.valid = max(0, min(self.local, length - self.start))

    # -- entering and leaving the split ------------------------------------------------------------------
    def split(self, t: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's slice of `t` along `dim` (zero-padded to `size * local` first)."""
        pad = self.size * self.local - t.shape[dim]
        if pad:
            t = torch.cat([t, t.new_zeros(*t.shape[:dim], pad, *t.shape[dim + 1:])], dim=dim)
        return t.narrow(dim, self.start, self.local).contiguous()

    def enter(self, tokens, rope, seq_lens):
        """Slices of the tokens `[B, L, C]` and the RoPE tables `[L, 1, D/2]`; key lengths that hide the padding."""
        if seq_lens is None and self.size * self.local != self.length:
            seq_lens = torch.full((tokens.shape[0],), self.length, dtype=torch.long)
        return self.split(tokens), tuple(self.split(t, 0) for t in rope), seq_lens

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """The whole sequence `[B, length, ...]` from every rank's slice `[B, local, ...]`, on every rank."""
        pieces = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(pieces, t.contiguous(), group=self.group)
        return torch.cat(pieces, dim=1)[:, :self.length]

    # -- self-attention --------------------------------------------------------------------------------
    def _exchange(self, t: torch.Tensor) -> torch.Tensor:
        """all-to-all of `[size, ...]`: chunk j goes to rank j, chunk i of the result came from rank i."""
        out = torch.empty_like(t)
        dist.all_to_all_single(out, t, group=self.group)
        return out

    def self_attention(self, attend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """`attend(q, k, v)` over the whole sequence for this rank's heads; q, k, v and the result are
        `[B, local, H, D]` slices (all heads)."""
        b, n, h, d = q.shape
        if h % self.size:
            raise ValueError(f"sequence parallelism over {self.size} GPUs needs a head count divisible by {self.size}; "
                             f"the model has {h} heads (Wan 14B: 40 heads, so 2, 4, 5 or 8 GPUs)")
        hs = h // self.size
        qkv = torch.stack([q, k.to(q.dtype), v.to(q.dtype)]).view(3, b, n, self.size, hs, d)
        qkv = self._exchange(qkv.permute(3, 0, 1, 2, 4, 5).contiguous())          # [src rank, 3, B, n, hs, d]
        qkv = qkv.permute(1, 2, 0, 3, 4, 5).reshape(3, b, self.size * n, hs, d)
        out = attend(qkv[0], qkv[1], qkv[2])                                        # [B, size*n, hs, d]
        out = out.reshape(b, self.size, n, hs, d).transpose(0, 1).contiguous()     # [dest rank, B, n, hs, d]
        out = self._exchange(out)                                                   # [head chunk, B, n, hs, d]
        return out.permute(1, 2, 0, 3, 4).reshape(b, n, h, d)

    def reference_keys(self, k: torch.Tensor) -> torch.Tensor:
        """The keys of the first latent frame `[B, h*w, H, D]` (two-speaker reference map), on every rank: sent by
        the first rank when its slice holds the whole frame, else gathered from the slices."""
        frame_tokens = self.grid[1] * self.grid[2]
        if frame_tokens <= self.local:
            first = k[:, :frame_tokens].clone()  # received in place on the other ranks: never a view of k
            dist.broadcast(first, src=dist.get_global_rank(self.group, 0) if self.group is not None else 0,
                           group=self.group)
            return first
        pieces = [torch.empty_like(k) for _ in range(self.size)]
        dist.all_gather(pieces, k.contiguous(), group=self.group)
        return torch.cat(pieces, dim=1)[:, :frame_tokens]

    def extrema(self, row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-batch (min, max) `[B, 1]` of `row` `[B, local]` over the real tokens of every rank."""
        real = torch.arange(row.shape[1], device=row.device) < self.valid
        lo = torch.where(real, row.float(), torch.inf).amin(dim=1, keepdim=True)
        hi = torch.where(real, row.float(), -torch.inf).amax(dim=1, keepdim=True)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=self.group)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=self.group)
        return lo.to(row.dtype), hi.to(row.dtype)

    # -- per-frame audio attention -----------------------------------------------------------------------
    def frame_attention(self, attend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q `[B, local, H, D]` (this slice), k/v `[B, F*N, H, D]` (all frames): each token attends to the N keys of
        its own frame. The slice is laid into the whole frames it touches (zeros around), one batch entry per
        frame, as the unsplit model does."""
        b, _, h, d = q.shape
        frame_tokens = self.grid[1] * self.grid[2]
        out = q.new_zeros(q.shape)
        if self.valid == 0:
            return out
        n = k.shape[1] // self.grid[0]
        f0, f1 = self.start // frame_tokens, -(-(self.start + self.valid) // frame_tokens)
        offset = self.start - f0 * frame_tokens
        frames = q.new_zeros(b, (f1 - f0) * frame_tokens, h, d)
        frames[:, offset:offset + self.valid] = q[:, :self.valid]
        per_frame = lambda t, tokens: t.reshape(b * (f1 - f0), tokens, h, d)
        keys = lambda t: per_frame(t[:, f0 * n:f1 * n], n)
        result = attend(per_frame(frames, frame_tokens), keys(k), keys(v)).reshape(b, -1, h, d)
        out[:, :self.valid] = result[:, offset:offset + self.valid]
        return out

