"""Peak-VRAM planning: estimate what a run will need BEFORE sampling, and say what to change when it won't fit.

A CUDA out-of-memory error mid-run loses the work done and names nothing useful; the plan is checked before the
first block runs instead. The activation estimate follows the block code (model.py, fused_ops.py) phase by phase, in
units of one `[tokens, dim]` tensor; `bench/memory.py` prints it beside the GPU's measured peak.

The plan bounds what torch's CUDA allocator RESERVES, not only what tensors occupy: a cap (a small card, or
`set_per_process_memory_fraction`) is hit by reserved bytes, and the caching allocator can keep more than a GiB of
split, unusable segments at the peak (issue 15: an accepted 33-frame run died with 1.12 GiB "reserved but
unallocated"). So the pack turns on expandable segments where the native allocator has them (fragments are then
unmapped and re-mapped instead of stranded), and the plan adds what the allocator in use may hold beyond the
tensors (`Allocator.overhead`).
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn

from ..fp8_optimization import QuantizedLinear

GIB = 2**30
MIB = 2**20
BASE_MARGIN = 384 * MIB          # allocator rounding and fragmentation, cuBLAS/cuDNN workspaces
MARGIN_FRACTION = 0.08           # of the activations
VAE_BASE_CHANNELS = 96           # Wan 2.1 VAE decoder width at full resolution
VAE_WORKSET = 10                 # live `[96, 4 frames, h, w]` tensors in the decoder's last stage (conservative)


log = logging.getLogger("wantalk")

EXPANDABLE_PAGE = 20 * MIB       # expandable segments map the large pool in 20 MiB pages
EXPANDABLE_GAPS = 16             # live tensors at a block's peak; each may strand a partly used page at its ends
ASYNC_SLACK = 64 * MIB           # cudaMallocAsync: the cap counts bytes in use; the driver pool rounds small blocks
FRAGMENT_FACTOR = 4              # native segments without expandable: largest transient tensors stranded as splits


class MemoryPlanError(RuntimeError):
    """The settings will not fit in the available VRAM; the message says what to change."""


def tensor_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


@dataclass(frozen=True)
class ModelBytes:
    """Weight sizes as the model holds them (quantized bytes as stored); works on the meta device."""
    other: int                     # everything outside the transformer blocks (always resident)
    blocks: tuple[int, ...]        # packed bytes of each block
    dequant_temp: int              # largest weight a quantized linear materialises while it runs
    compute_bytes: int = 2         # bytes per element of the compute dtype

    @classmethod
    def of(cls, model: nn.Module) -> "ModelBytes":
        from .block_swap import block_layout
        blocks = tuple(block_layout(b).nbytes for b in model.blocks)
        other = sum(tensor_bytes(child) for name, child in model.named_children() if name != "blocks")
        compute = getattr(model, "compute_dtype", torch.bfloat16).itemsize
        temp = max((m.in_features * m.out_features * compute for m in model.blocks.modules()
                    if isinstance(m, QuantizedLinear)), default=0)
        return cls(other, blocks, temp, compute)

    @property
    def total(self) -> int:
        return self.other + sum(self.blocks)


@dataclass(frozen=True)
class Allocator:
    """Torch's CUDA allocator as the plan sees it: what it may reserve beyond the tensors at the peak."""
    backend: str = "native"        # torch.cuda.get_allocator_backend(): "native" or "cudaMallocAsync"
    expandable: bool = True        # native only: expandable segments on

    def overhead(self, largest_transient: int) -> int:
        """Reserved-but-unallocated bytes at the peak, at most.

        cudaMallocAsync: the memory fraction is checked against bytes in use and the driver's pool maps pages, so
        only rounding (ASYNC_SLACK). Native with expandable segments: free pages are unmapped on demand; what
        stays is a partly used page next to each live tensor. Native without: freed blocks stay in their segments
        and are split for smaller tensors, so a few of the largest transient tensors can be stranded (measured
        1.12 GiB beside a 372 MiB request, issue 15); FRAGMENT_FACTOR of them are planned."""
        if self.backend == "cudaMallocAsync":
            return ASYNC_SLACK
        if self.expandable:
            return EXPANDABLE_GAPS * EXPANDABLE_PAGE
        return FRAGMENT_FACTOR * largest_transient

    def describe(self) -> str:
        if self.backend != "native":
            return self.backend
        return "native, expandable segments" if self.expandable else "native, fixed segments"


_ALLOC_CONF_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
_expandable_turned_on = False


def _alloc_conf() -> dict[str, str]:
    """The user's allocator settings (`key:value,key:value`) from the environment."""
    out = {}
    for var in _ALLOC_CONF_VARS:
        for item in os.environ.get(var, "").split(","):
            key, _, value = item.partition(":")
            if key.strip():
                out[key.strip()] = value.strip()
    return out


def use_expandable_segments() -> Allocator:
    """Turn on expandable segments for new allocations unless the user chose otherwise, and say which allocator
    the plan must assume.

    `PYTORCH_CUDA_ALLOC_CONF` is read once, at CUDA start, but the native allocator reads this one setting at each
    new segment, so it can be switched on after ComfyUI started CUDA. ComfyUI usually selects cudaMallocAsync
    (its default on torch 2 with CUDA), which needs nothing; an explicit `expandable_segments:False` is
    respected; platforms without the feature (not Linux) keep fixed segments, and the plan reserves for them."""
    global _expandable_turned_on
    if not torch.cuda.is_available():
        return Allocator()
    backend = torch.cuda.get_allocator_backend()
    if backend != "native":
        return Allocator(backend, expandable=False)
    choice = _alloc_conf().get("expandable_segments")
    if choice is not None:
        return Allocator(backend, expandable=choice.lower() == "true" and sys.platform.startswith("linux"))
    if not sys.platform.startswith("linux"):
        return Allocator(backend, expandable=False)
    if not _expandable_turned_on:
        try:
            torch.cuda.memory._set_allocator_settings("expandable_segments:True")
        except (AttributeError, RuntimeError) as exc:  # a torch without the runtime switch
            log.warning("wantalk: could not turn on expandable CUDA segments (%s); the memory plan reserves room "
                        "for fragmentation instead. Setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True "
                        "before starting gives longer windows on small cards.", exc)
            return Allocator(backend, expandable=False)
        _expandable_turned_on = True
        log.info("wantalk: turned on expandable CUDA segments (less fragmentation on small cards); set "
                 "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False to keep fixed segments")
    return Allocator(backend, expandable=True)


@dataclass(frozen=True)
class RunSettings:
    tokens: int                    # video tokens per sample: latent frames * (h/2) * (w/2)
    batch: int = 1
    audio: bool = True             # an audio cross-attention runs in every block
    two_speakers: bool = False     # InfiniteTalk two speakers: q/k kept for the reference attention map
    fused: bool = True             # the Triton block stages run (CUDA with Triton); False: torch fallbacks


@dataclass(frozen=True)
class DecodeSettings:
    frames: int                    # video frames decoded at once (a window)
    height: int
    width: int
    tile_size: int | None = None   # pixels; None: untiled
    tile_overlap: int = 64
    dtype_bytes: int = 4           # VAE compute dtype
    release_model: bool = True     # resident weights dropped (block_swap.release_vram) before the decode


def video_tokens(frames: int, height: int, width: int, patch=(1, 2, 2), vae_stride=(4, 8, 8)) -> int:
    lat_f = (frames - 1) // vae_stride[0] + 1
    return (lat_f // patch[0]) * (height // vae_stride[1] // patch[1]) * (width // vae_stride[2] // patch[2])


def activation_bytes(cfg, run: RunSettings, compute_bytes: int = 2, dequant_temp: int = 0) -> int:
    """Peak bytes a block's forward allocates beyond the weights, batch included.

    In element counts U = tokens x dim and V = tokens x ffn_dim (c = bytes of the compute dtype), read from
    model.py with the fused stages of fused_ops.py (Triton on CUDA). Held through every phase: the caller's
    float32 residual and the block's current one (8U bytes). Phases:
    - self-attention: modulated input, q, k, v, a linear's output, the attention output (6cU) + kernel workspace
      (int8/fp8 copies of q/k/v, 3U);
    - FFN: GELU input and output (2cV), a dequantized weight while a quantized linear runs, the fp8 activation
      copy of fast modes (V);
    - audio cross-attention: float32 LayerNorm output (4U) + its cast, q, output, projection (4cU); two speakers
      keep q and k (2cU) for the reference attention map, which adds its own output (2cU);
    - the residual update: a third float32 residual (4U) while the branch output (cU) is alive.
    Without Triton the torch fallbacks keep float32 copies: up to 16U more in the normalisation/RoPE stages.
    """
    u = run.tokens * run.batch * cfg.dim
    v = run.tokens * run.batch * cfg.ffn_dim
    c = compute_bytes
    held = 8 * u
    self_attn = held + 6 * c * u + 3 * u
    ffn = held + max(c * u + c * v, 2 * c * v + v) + dequant_temp
    audio = held + 4 * u + 4 * c * u + (4 * c * u if run.two_speakers else 0) if run.audio else 0
    residual = held + 4 * u + c * u + (2 * c * u if run.two_speakers else 0)
    peak = max(self_attn, ffn, audio, residual)
    if not run.fused:
        peak += 16 * u
    small = 64 * run.tokens * run.batch * 4 + 64 * MIB  # RoPE tables, context, embeddings, head output
    return peak + small


def largest_transient(cfg, run: RunSettings, compute_bytes: int = 2, dequant_temp: int = 0) -> int:
    """The largest tensor a block allocates and frees: an FFN activation, a float32 residual or a dequantized
    weight (what a fragmented allocator must find in one piece)."""
    tokens = run.tokens * run.batch
    return max(compute_bytes * tokens * cfg.ffn_dim, 4 * tokens * cfg.dim, dequant_temp)


def vae_decode_bytes(d: DecodeSettings) -> int:
    """Decoder working set for one latent frame (4 output frames) of one tile, plus the output video and the
    blending buffers. Calibrated conservatively; bench/memory.py reports the measured value beside it."""
    if d.tile_size is None:
        h, w = d.height, d.width
    else:
        h, w = min(d.height, d.tile_size), min(d.width, d.tile_size)
    workset = VAE_WORKSET * VAE_BASE_CHANNELS * 4 * h * w * d.dtype_bytes
    video = 3 * d.frames * d.height * d.width * 4
    return workset + (3 if d.tile_size else 2) * video


@dataclass(frozen=True)
class MemoryPlan:
    num_blocks: int
    blocks_to_swap: int
    prefetch: int
    weights: int                   # resident weights: everything but the streamed blocks
    slots: int                     # GPU slots streamed blocks are copied into
    activations: int
    margin: int
    block_bytes: int               # largest block (what one more swapped block saves)
    decode: int = 0
    decode_settings: DecodeSettings | None = None
    tokens: int = 0
    notes: tuple[str, ...] = field(default=())
    reserve: int = 0               # what the allocator may hold beyond the tensors (Allocator.overhead)
    allocator: Allocator = Allocator()

    @property
    def sampling_peak(self) -> int:
        return self.weights + self.slots + self.activations + self.margin + self.reserve

    @property
    def decode_peak(self) -> int:
        if not self.decode:
            return 0
        keep = 0 if self.decode_settings.release_model else self.weights + self.slots
        return keep + self.decode + BASE_MARGIN

    @property
    def peak(self) -> int:
        return max(self.sampling_peak, self.decode_peak)

    def summary(self) -> str:
        text = (f"peak {self.sampling_peak / GIB:.2f} GiB while sampling: weights {self.weights / GIB:.2f}, "
                f"swap slots {self.slots / GIB:.2f}, activations {self.activations / GIB:.2f} at {self.tokens} "
                f"tokens, margin {self.margin / GIB:.2f}, allocator reserve {self.reserve / GIB:.2f} "
                f"({self.allocator.describe()})")
        if self.decode:
            text += f"; VAE decode {self.decode_peak / GIB:.2f} GiB"
        return text

    def check(self, available: int, *, fits_with_swap: int | None = None) -> None:
        """Raise MemoryPlanError naming what to change when the plan needs more than `available` bytes."""
        if self.peak <= available:
            return
        raise MemoryPlanError(self.advice(available, fits_with_swap))

    def advice(self, available: int, fits_with_swap: int | None = None) -> str:
        lines = [f"wantalk: this run needs about {self.peak / GIB:.1f} GiB of VRAM but {available / GIB:.1f} GiB "
                 f"is available ({self.summary()}). Change one of:"]
        if self.sampling_peak > available:
            if fits_with_swap is not None and fits_with_swap > self.blocks_to_swap:
                lines.append(f"- swap more blocks: blocks_to_swap={fits_with_swap} (or -1 for auto) fits")
            elif self.blocks_to_swap < self.num_blocks:
                lines.append(f"- swap more blocks (now {self.blocks_to_swap} of {self.num_blocks}); each saves "
                             f"{self.block_bytes / GIB:.2f} GiB")
            lines.append("- a smaller quantization: fp8_e4m3fn_scaled halves bf16 weights, fp4_scaled quarters them "
                         "(fewer blocks to swap, smaller swap slots)")
            if self.prefetch > 0 and self.blocks_to_swap > 1:
                lines.append(f"- prefetch 0 saves one swap slot ({self.block_bytes / GIB:.2f} GiB) at some speed")
            lines.append(f"- a smaller window or resolution: activations grow with the {self.tokens} tokens "
                         f"(frames/4+1 x height/16 x width/16); e.g. frame_window 49 instead of 81")
            if self.allocator.backend == "native" and not self.allocator.expandable:
                lines.append(f"- expandable CUDA segments (start with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:"
                             f"True, Linux): the {self.reserve / GIB:.2f} GiB reserved for fragmentation shrinks "
                             f"to {Allocator().overhead(0) / GIB:.2f}")
        if self.decode_peak > available:
            d = self.decode_settings
            if d.tile_size is None or d.tile_size > 256:
                lines.append("- a tiled VAE decode (tile_size 256, overlap 64)")
            if not d.release_model:
                lines.append("- release the model's VRAM before the VAE decode (block_swap.release_vram)")
        return "\n".join(lines)


def plan_memory(cfg, sizes: ModelBytes, run: RunSettings, *, blocks_to_swap: int, prefetch: int = 1,
                decode: DecodeSettings | None = None, allocator: Allocator = Allocator()) -> MemoryPlan:
    """The plan for streaming the last `blocks_to_swap` blocks with `prefetch` blocks copied ahead, under
    `allocator` (what reserves the memory)."""
    n = len(sizes.blocks)
    if not 0 <= blocks_to_swap <= n:
        raise ValueError(f"blocks_to_swap must be 0..{n} here, got {blocks_to_swap}")
    keep = n - blocks_to_swap
    streamed = sizes.blocks[keep:]
    slots = min(prefetch + 1, blocks_to_swap) * max(streamed, default=0)
    acts = activation_bytes(cfg, run, sizes.compute_bytes, sizes.dequant_temp)
    return MemoryPlan(num_blocks=n, blocks_to_swap=blocks_to_swap, prefetch=prefetch,
                      weights=sizes.other + sum(sizes.blocks[:keep]), slots=slots, activations=acts,
                      margin=BASE_MARGIN + int(MARGIN_FRACTION * acts), block_bytes=max(sizes.blocks, default=0),
                      decode=vae_decode_bytes(decode) if decode else 0, decode_settings=decode, tokens=run.tokens,
                      reserve=allocator.overhead(largest_transient(cfg, run, sizes.compute_bytes, sizes.dequant_temp)),
                      allocator=allocator)


def choose_blocks_to_swap(cfg, sizes: ModelBytes, run: RunSettings, available: int, *, prefetch: int = 1,
                          decode: DecodeSettings | None = None, allocator: Allocator = Allocator()) -> int:
    """The fewest swapped blocks whose plan fits in `available` bytes; MemoryPlanError when none does."""
    n = len(sizes.blocks)
    plan = {"prefetch": prefetch, "decode": decode, "allocator": allocator}
    for k in range(n + 1):
        if plan_memory(cfg, sizes, run, blocks_to_swap=k, **plan).peak <= available:
            return k
    plan_memory(cfg, sizes, run, blocks_to_swap=n, **plan).check(available)
    raise AssertionError("unreachable: check() raises when nothing fits")


def fitting_swap(cfg, sizes: ModelBytes, run: RunSettings, available: int, *, prefetch: int = 1,
                 decode: DecodeSettings | None = None, allocator: Allocator = Allocator()) -> int | None:
    """Like choose_blocks_to_swap, but None instead of an error (for advice)."""
    try:
        return choose_blocks_to_swap(cfg, sizes, run, available, prefetch=prefetch, decode=decode,
                                     allocator=allocator)
    except MemoryPlanError:
        return None


def memory_fraction(device) -> float:
    """The per-process fraction set with `torch.cuda.set_per_process_memory_fraction` (1.0 where this torch or
    allocator cannot tell)."""
    getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    try:
        return getter(device) if getter is not None else 1.0
    except RuntimeError:  # cudaMallocAsync in some torch versions
        return 1.0


def available_vram(device) -> int:
    """Bytes this process can still have reserved on `device`, capped by `set_per_process_memory_fraction`
    (which `mem_get_info` does not see).

    Unused cached segments are released first (empty_cache). With the native allocator, what stays reserved but
    unallocated is fragments of segments in use, which a large tensor cannot use: it counts as used, since the
    native cap is checked against reserved bytes. cudaMallocAsync checks the cap against bytes in use and reuses
    its pool, so there the cached bytes count as free."""
    device = torch.device(device)
    if device.type != "cuda":
        return 1 << 62
    if device.index is None:  # some torch.cuda queries need an explicit index
        device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    reserved = torch.cuda.memory_reserved(device)
    pooled = torch.cuda.get_allocator_backend() == "cudaMallocAsync"
    held = allocated if pooled else reserved
    available = free + (reserved - allocated if pooled else 0)
    fraction = memory_fraction(device)
    if fraction < 1.0:
        available = min(available, int(fraction * total) - held)
    return max(0, available)


def fused_stages(device: torch.device) -> bool:
    """Whether the block's fused (Triton) stages serve tensors on `device` (they use less memory)."""
    from .modules import fused_ops
    return fused_ops._use_triton(torch.empty(0, device=device))


def check_before_sampling(model: nn.Module, run: RunSettings, decode: DecodeSettings | None = None) -> None:
    """Before a run: raise MemoryPlanError with what to change when its activations (and VAE decode) will not fit.

    A block-swapped model is planned by its swapper now (blocks to stream chosen, slots allocated), not at its
    first block: the model's input stage allocates a few `[tokens, dim]` tensors before any block runs, and a
    run too large for the card must be refused before them (a 720p, 161-frame run on 8 GB died there). A model
    on a CUDA device is checked against its resident weights; CPU models are not checked."""
    runner = getattr(model, "block_runner", None)
    if hasattr(runner, "plan_run"):
        runner.plan_run(model, replace(run, fused=fused_stages(runner.device)), decode)
        return
    device = next(model.parameters()).device
    if device.type != "cuda" or runner is not None:
        return
    run = replace(run, fused=fused_stages(device))  # CUDA without Triton runs the torch stages: more memory
    sizes = ModelBytes.of(model)
    allocator = use_expandable_segments()
    plan = plan_memory(model.cfg, sizes, run, blocks_to_swap=0, decode=decode, allocator=allocator)
    budget = available_vram(device) + plan.weights  # the resident weights are already allocated
    if plan.peak > budget:
        raise MemoryPlanError(plan.advice(budget, fitting_swap(model.cfg, sizes, run, budget, decode=decode,
                                                               allocator=allocator)))
