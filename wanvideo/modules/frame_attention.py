"""Per-frame attention of video tokens to audio tokens (InfiniteTalk's and HuMo's audio cross-attention): the h*w
tokens of latent frame f see only frame f's audio keys. Under sequence parallelism the tokens are one rank's slice,
and the slice's `shard` (wanvideo.parallel.sequence) lays them into whole frames."""
from __future__ import annotations

import torch


def frame_attention(attend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid, shard=None) -> torch.Tensor:
    """`attend` per frame: q `[B, Lq, H, D]` (all F*h*w tokens, or a `shard`'s slice), k/v `[B, F*N, H, D]` ->
    `[B, Lq, H, D]`."""
    if shard is not None:
        return shard.frame_attention(attend, q, k, v)
    b, _, h, d = q.shape
    per_frame = lambda t: t.reshape(b * grid[0], -1, h, d)
    return attend(per_frame(q), per_frame(k), per_frame(v)).reshape(b, -1, h, d)
