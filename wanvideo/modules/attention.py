"""The single attention entry point of the pack, and the dispatch to the kernels of `attention_kernels.py`.

Every attention site calls `attention(q, k, v, ...)` with `[B, L, H, D]` tensors. The mode names a preferred
kernel; the dispatcher walks that kernel's fallback chain and runs the first kernel whose contract covers the
call, so a kernel never sees an input it mishandles (wrong layout, misaligned pointer, key length it gets wrong,
a mask it would drop) and the caller never gets an error or a wrong result because of a kernel's limits.

Policy (why `auto` is what it is):
- `auto` and `sdpa` use exact kernels only. Quantized kernels (`sageattn*`, the pack's own `int8_triton`) are
  an explicit choice: their error (1-4% relative) is a quality trade the user makes, not a dispatch detail.
- On sm90+ cuDNN SDPA comes first (H100, Wan shapes: 590 TFLOP/s against 353 for SDPA-flash), but only for
  calls without masks and without GQA, where it has no known wrong-result reports; key lengths (`k_lens`) are
  applied by slicing the batch into runs of equal length, so those calls stay unmasked. Masked calls go to
  flash-free backends that honour masks (memory-efficient, then math).
- Below sm90 flash kernels come first (cuDNN is not the fastest there).
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .attention_kernels import KERNELS, Call, Kernel

log = logging.getLogger("wantalk")

ATTENTION_MODES = ("auto", "sdpa", "flash_attn", "sageattn", "sageattn_3", "sageattn_3_fp4", "sageattn_3_fp8",
                   "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "sdpa_math", "int8_triton")

# Kernels tried first for each mode; the device's exact chain follows.
_MODE_HEADS = {
    "auto": (), "sdpa": (), "flash_attn": ("flash_attn",), "sageattn": ("sageattn",),
    "sageattn_3": ("sageattn_3", "sageattn"), "sageattn_3_fp4": ("sageattn_3_fp4", "sageattn"),
    "sageattn_3_fp8": ("sageattn_3_fp8", "sageattn"),
    "sdpa_cudnn": ("sdpa_cudnn",), "sdpa_flash": ("sdpa_flash",), "sdpa_efficient": ("sdpa_efficient",),
    "sdpa_math": ("sdpa_math",), "int8_triton": ("int8_triton",),
}

# Beyond this many runs of equal key length, k_lens becomes a mask instead of one launch per run.
MAX_KEY_LENGTH_RUNS = 8


def exact_chain(device_type: str, capability: tuple[int, int] | None) -> tuple[str, ...]:
    """Exact kernels, fastest first, for a device (see the module docstring for the measurements)."""
    if device_type != "cuda":
        return ("sdpa_native", "sdpa_math")
    if capability is not None and capability >= (9, 0):
        return ("sdpa_cudnn", "flash_attn", "sdpa_flash", "sdpa_efficient", "sdpa_math")
    return ("flash_attn", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "sdpa_math")


def kernel_chain(mode: str, device_type: str, capability: tuple[int, int] | None) -> tuple[str, ...]:
    """Kernel names tried in order for `mode`; the last one serves every call."""
    tail = exact_chain(device_type, capability)
    if mode.startswith("sdpa"):
        tail = tuple(name for name in tail if name.startswith("sdpa"))
    return tuple(dict.fromkeys(_MODE_HEADS[mode] + tail))


# ------------------------------------------------------------------------------------------------------------
# Copy accounting and one-time log lines
# ------------------------------------------------------------------------------------------------------------

class CopyCount:
    count = 0


_copy_counters: list[CopyCount] = []
_noted: set[tuple[str, str]] = set()
_unavailable: dict[Kernel, str | None] = {}


@contextmanager
def count_copies():
    """Count the q/k/v copies the dispatcher makes inside the block (tests assert the minimum)."""
    counter = CopyCount()
    _copy_counters.append(counter)
    try:
        yield counter
    finally:
        _copy_counters.remove(counter)


def _note(mode: str, kernel: str, reason: str, chosen: bool) -> None:
    """One log line per (mode, reason): a fallback is news once, not on every attention call."""
    key = (mode, f"{kernel}: {reason}")
    if key in _noted:
        return
    _noted.add(key)
    (log.warning if chosen else log.info)("attention mode %r: %s: %s; using the next kernel", mode, kernel, reason)


def _unavailable_reason(kernel: Kernel) -> str | None:
    if kernel not in _unavailable:
        _unavailable[kernel] = kernel.unavailable()
    return _unavailable[kernel]


# ------------------------------------------------------------------------------------------------------------
# Call preparation
# ------------------------------------------------------------------------------------------------------------

@dataclass
class _Plan:
    call: Call
    scale: float
    segments: list[tuple[int, int, int]]   # (first batch item, end, key length): one kernel launch each
    mask: torch.Tensor | None              # broadcastable to [B, H, Lq, Lk]; bool or additive


def _validate(q, k, v, mode):
    if mode not in _MODE_HEADS:
        raise ValueError(f"unknown attention mode {mode!r}; expected one of {', '.join(ATTENTION_MODES)}")
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention expects [B, L, H, D] tensors, got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match: k and v "
                         "must have equal shapes, and batch and head dim must equal q's")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{q.shape[2]} query heads are not a multiple of {k.shape[2]} key heads")
    if k.shape[1] == 0:
        raise ValueError("attention over zero keys is undefined")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v on different devices: {q.device}, {k.device}, {v.device}")


def _key_lengths(k_lens, batch: int, lk: int) -> tuple[int, ...] | None:
    """Per-item key lengths as ints, None when absent or all full."""
    if k_lens is None:
        return None
    lens = tuple(int(n) for n in (k_lens.tolist() if torch.is_tensor(k_lens) else k_lens))
    if len(lens) != batch or not all(1 <= n <= lk for n in lens):
        raise ValueError(f"k_lens must hold {batch} key counts in [1, {lk}], got {lens}")
    return None if all(n == lk for n in lens) else lens


def _runs(lens: tuple[int, ...]) -> list[tuple[int, int, int]]:
    runs = []
    for i, n in enumerate(lens):
        if runs and runs[-1][2] == n:
            runs[-1] = (runs[-1][0], i + 1, n)
        else:
            runs.append((i, i + 1, n))
    return runs


def _mask(attn_mask, lens, shape, dtype, device) -> torch.Tensor | None:
    """attn_mask and key lengths as one mask broadcastable to `shape` = (B, H, Lq, Lk)."""
    mask = attn_mask
    if mask is not None:
        if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
            raise ValueError(f"attn_mask must be bool (True = attend) or additive float, got {mask.dtype}")
        try:
            ok = torch.broadcast_shapes(mask.shape, shape) == torch.Size(shape)
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"attn_mask of shape {tuple(mask.shape)} does not broadcast to [B, H, Lq, Lk] = "
                             f"{list(shape)}")
        mask = mask.to(device)
        while mask.ndim < 4:
            mask = mask.unsqueeze(0)
        if mask.dtype != torch.bool:
            mask = mask.to(dtype)   # cuDNN misreads masks of another dtype (pytorch#191612); others reject them
    if lens is not None:
        keep = (torch.arange(shape[3], device=device)[None, :] < torch.tensor(lens, device=device)[:, None])
        keep = keep[:, None, None, :]
        if mask is None:
            mask = keep
        elif mask.dtype == torch.bool:
            mask = mask & keep
        else:
            mask = mask.masked_fill(~keep, float("-inf"))
    return mask


def _capability(device: torch.device) -> tuple[int, int] | None:
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def _plan(q, k, v, mode, k_lens, attn_mask, scale) -> _Plan:
    _validate(q, k, v, mode)
    b, lq, hq, d = q.shape
    lk, hk = k.shape[1], k.shape[2]
    dtype = q.dtype if q.dtype.is_floating_point and q.dtype.itemsize >= 2 else torch.bfloat16
    scale = d ** -0.5 if scale is None else float(scale)
    lens = _key_lengths(k_lens, b, lk)
    if lens is not None and attn_mask is None and len(_runs(lens)) <= MAX_KEY_LENGTH_RUNS:
        segments, mask = _runs(lens), None
    else:
        segments, mask = [(0, b, lk)], _mask(attn_mask, lens, (b, hq, lq, lk), dtype, q.device)
    call = Call(device_type=q.device.type, capability=_capability(q.device), dtype=dtype, head_dim=d,
                q_heads=hq, kv_heads=hk, kv_lens=tuple(n for _, _, n in segments), has_mask=mask is not None,
                default_scale=abs(scale - d ** -0.5) <= 1e-12 * d ** -0.5,
                largest_numel=max(b * lq * hq, b * lk * hk) * d)
    return _Plan(call, scale, segments, mask)


def _candidates(mode: str, call: Call):
    """Kernels able to serve `call`, in chain order; the ones passed over are logged once."""
    for position, name in enumerate(kernel_chain(mode, call.device_type, call.capability)):
        kernel = KERNELS[name]
        reason = _unavailable_reason(kernel) or kernel.contract.rejection(call)
        if reason is None:
            yield kernel
        else:
            _note(mode, name, reason, chosen=position == 0 and mode not in ("auto", "sdpa"))


# ------------------------------------------------------------------------------------------------------------
# Running a kernel
# ------------------------------------------------------------------------------------------------------------

def _fit(t: torch.Tensor, kernel: Kernel, dtype: torch.dtype, head_dim: int, private: bool) -> torch.Tensor:
    """`t` ([B, L, H, D]) as the kernel's contract wants it: a view when it complies, else ONE copy."""
    contract = kernel.contract
    view = t.transpose(1, 2) if contract.layout == "HND" else t
    if (not private and view.dtype == dtype and view.shape[-1] == head_dim
            and contract.layout_violation(view) is None):
        return view
    for counter in _copy_counters:
        counter.count += 1
    shape = (*view.shape[:-1], head_dim)
    fresh = view.new_zeros(shape, dtype=dtype) if head_dim != view.shape[-1] else view.new_empty(shape, dtype=dtype)
    fresh[..., :view.shape[-1]].copy_(view)
    return fresh


def _run(kernel: Kernel, q, k, v, plan: _Plan) -> torch.Tensor:
    d = q.shape[-1]
    fed = kernel.contract.feed_head_dim(d)
    outs = []
    for b0, b1, n in plan.segments:
        whole = (b0, b1, n) == (0, q.shape[0], k.shape[1])
        qs, ks, vs = (q, k, v) if whole else (q[b0:b1], k[b0:b1, :n], v[b0:b1, :n])
        out = kernel.run(_fit(qs, kernel, plan.call.dtype, fed, False),
                         _fit(ks, kernel, plan.call.dtype, fed, kernel.contract.clobbers_k),
                         _fit(vs, kernel, plan.call.dtype, fed, False),
                         scale=plan.scale, mask=plan.mask)
        out = out.transpose(1, 2) if kernel.contract.layout == "HND" else out
        outs.append(out[..., :d])
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)


def select_kernel(q, k, v, *, mode: str = "auto", k_lens=None, attn_mask=None, scale: float | None = None) -> str:
    """Name of the kernel `attention` would run for these inputs (before any runtime failure)."""
    plan = _plan(q, k, v, mode, k_lens, attn_mask, scale)
    return next(_candidates(mode, plan.call)).name


@torch.compiler.disable   # the dispatch reads pointers, strides and k_lens values: one eager graph break
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mode: str = "auto",
              k_lens: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
              scale: float | None = None) -> torch.Tensor:
    """Attention over `[B, L, H, D]` inputs; returns `[B, Lq, H, D]` in q's dtype. Inputs are never modified.

    k_lens: `[B]` number of valid keys per batch item (the rest are padding).
    attn_mask: bool (True = attend) or additive float, broadcastable to `[B, H, Lq, Lk]`.
    scale: softmax scale, default head_dim ** -0.5.
    """
    plan = _plan(q, k, v, mode, k_lens, attn_mask, scale)
    if q.shape[1] == 0:
        return q.new_empty(q.shape)
    for kernel in _candidates(mode, plan.call):
        try:
            out = _run(kernel, q, k, v, plan)
        except torch.cuda.OutOfMemoryError:
            raise
        except (RuntimeError, ValueError, NotImplementedError) as err:
            first_line = (str(err).splitlines() or [""])[0][:160]
            _note(mode, kernel.name, f"failed: {type(err).__name__}: {first_line}", chosen=True)
            continue
        return out.to(q.dtype)
    raise RuntimeError(f"no attention kernel could serve mode {mode!r} on {q.device} (the last kernel of every "
                       "chain accepts all inputs, so this is a bug in the kernel table)")
