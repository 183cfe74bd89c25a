"""Spatial tiling with linear blending, so the VAE can encode/decode large frames in bounded memory.

Tiles are laid out on the latent grid (so encoder tiles start on multiples of 8 pixels and every tile maps to
whole latents). Each tile runs through the whole clip on its own (its own causal cache); overlapping outputs
are cross-faded with linear ramps and normalised by the summed weights.
"""
from __future__ import annotations

from typing import Callable

import torch


def tile_spans(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """`[start, end)` spans of size `tile` stepping by `tile - overlap`; the last one ends at `length`."""
    if length <= tile:
        return [(0, length)]
    starts = list(range(0, length - tile, tile - overlap)) + [length - tile]
    return [(s, s + tile) for s in starts]


def edge_weights(spans: list[tuple[int, int]], index: int, scale: int) -> torch.Tensor:
    """1-D blending weights of tile `index` in output units (`scale` outputs per grid cell): ramps over the
    parts shared with the neighbouring tiles, 1 elsewhere. Two ramps over the same overlap sum to 1."""
    start, end = spans[index]
    n = (end - start) * scale
    j = torch.arange(n, dtype=torch.float32)
    w = torch.ones(n)
    if index > 0:
        left = (spans[index - 1][1] - start) * scale
        w = torch.minimum(w, (j + 1) / (left + 1))
    if index < len(spans) - 1:
        right = (end - spans[index + 1][0]) * scale
        w = torch.minimum(w, (n - j) / (right + 1))
    return w


def count_tiles(grid: tuple[int, int], tile: int, overlap: int) -> int:
    return len(tile_spans(grid[0], tile, overlap)) * len(tile_spans(grid[1], tile, overlap))


def run_tiled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *, grid: tuple[int, int], tile: int,
              overlap: int, in_scale: int, out_scale: int) -> torch.Tensor:
    """Apply `fn` to overlapping spatial tiles of `x` (`[..., H, W]`) and blend the results (in at least float32).

    grid: the latent grid (rows, cols); `tile`/`overlap` are in grid cells; `x` has `in_scale` and the output
    `out_scale` pixels per grid cell. A single tile calls `fn(x)` directly (bit-identical to no tiling)."""
    rows, cols = tile_spans(grid[0], tile, overlap), tile_spans(grid[1], tile, overlap)
    if len(rows) == len(cols) == 1:
        return fn(x)
    out = weight = None
    for i, (r0, r1) in enumerate(rows):
        row_w = edge_weights(rows, i, out_scale)
        for j, (c0, c1) in enumerate(cols):
            y = fn(x[..., r0 * in_scale:r1 * in_scale, c0 * in_scale:c1 * in_scale])
            y = y.to(torch.promote_types(y.dtype, torch.float32))
            w = (row_w[:, None] * edge_weights(cols, j, out_scale)[None, :]).to(y)
            if out is None:
                size = (grid[0] * out_scale, grid[1] * out_scale)
                out = y.new_zeros(*y.shape[:-2], *size)
                weight = y.new_zeros(size)
            region = (slice(r0 * out_scale, r1 * out_scale), slice(c0 * out_scale, c1 * out_scale))
            out[(..., *region)] += y * w
            weight[region] += w
    return out / weight
