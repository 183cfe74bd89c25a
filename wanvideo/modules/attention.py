"""The single attention entry point of the pack, and the dispatch to the kernels of `attention_kernels.py`.

Every attention site calls `attention(q, k, v, ...)` with `[B, L, H, D]` tensors. Which kernels may serve it is
one value, an `AttentionPolicy` (a mode name): the model carries it with each forward (`use_attention_policy`
around the blocks), so no module holds a mode of its own, and a site that must stay exact (the two-speaker
reference map, Whisper) asks for `attention_policy().exact()`. The policy names a preferred kernel; the
dispatcher walks that kernel's fallback chain and runs the first kernel whose contract covers the call, so a
kernel never sees an input it mishandles (wrong layout, misaligned pointer, key length it gets wrong, a mask it
would drop) and the caller never gets an error or a wrong result because of a kernel's limits.
The route (kernel, copies, log lines) depends only on the call's signature (mode, dtypes, shapes, strides,
pointer alignment class, device, key lengths, mask metadata, scale), so it is worked out once per signature and
cached: a repeated call costs a dict lookup and the kernel launch, not the contract walk.
A kernel that declines a call at run time raises `AttentionUnsupported`: logged once, remembered for that call
signature, and the next kernel serves. Any other exception is a bug and reaches the caller.

Policy (why `auto` is what it is):
- `auto` and `sdpa` use exact kernels only. Quantized kernels (`sageattn*`, the pack's own `int8_triton`) are
  an explicit choice: their error (1-4% relative) is a quality trade the user makes, not a dispatch detail.
- On sm90/sm100 FlashAttention-4, when installed, serves long key lengths (H200: 1.01x cuDNN at 4,096 keys,
  1.19x at 32,760; slower below, so `auto` hands shorter ones on: `auto_from_kv_len` of its contract).
- Then cuDNN SDPA (H100, Wan shapes: 590 TFLOP/s against 353 for SDPA-flash), but only for calls without masks
  and without GQA, where it has no known wrong-result reports; key lengths (`k_lens`) are applied by slicing
  the batch into runs of equal length, so those calls stay unmasked. Masked calls go to flash-free backends
  that honour masks (memory-efficient, then math).
- Below sm90 flash kernels come first (cuDNN is not the fastest there).
"""
from __future__ import annotations

import contextvars
import logging
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .attention_kernels import KERNELS, AttentionUnsupported, Call, Kernel, TableVersion

log = logging.getLogger("wantalk")

ATTENTION_MODES = ("auto", "sdpa", "flash_attn", "sageattn", "sageattn_3", "sageattn_3_fp4", "sageattn_3_fp8",
                   "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "sdpa_math", "int8_triton", "flash_attn_4")

# Kernels tried first for each mode; the device's exact chain follows.
_MODE_HEADS = {
    "auto": (), "sdpa": (), "flash_attn": ("flash_attn",), "sageattn": ("sageattn",),
    "sageattn_3": ("sageattn_3", "sageattn"), "sageattn_3_fp4": ("sageattn_3_fp4", "sageattn"),
    "sageattn_3_fp8": ("sageattn_3_fp8", "sageattn"),
    "sdpa_cudnn": ("sdpa_cudnn",), "sdpa_flash": ("sdpa_flash",), "sdpa_efficient": ("sdpa_efficient",),
    "sdpa_math": ("sdpa_math",), "int8_triton": ("int8_triton",), "flash_attn_4": ("flash_attn_4",),
}
QUANTIZED_MODES = frozenset(("sageattn", "sageattn_3", "sageattn_3_fp4", "sageattn_3_fp8", "int8_triton"))


@dataclass(frozen=True)
class AttentionPolicy:
    """Which attention kernels a forward may use: a mode of ATTENTION_MODES (validated here, once)."""
    mode: str = "auto"

    def __post_init__(self):
        if self.mode not in _MODE_HEADS:
            raise ValueError(f"unknown attention mode {self.mode!r}; expected one of {', '.join(ATTENTION_MODES)}")

    @property
    def quantized(self) -> bool:
        return self.mode in QUANTIZED_MODES

    def exact(self) -> AttentionPolicy:
        """This policy where it is exact, else `auto`: for sites whose result must not carry 8-bit error."""
        return AUTO if self.quantized else self


AUTO = AttentionPolicy()
_POLICIES = {mode: AttentionPolicy(mode) for mode in ATTENTION_MODES}
_current_policy: contextvars.ContextVar[AttentionPolicy] = contextvars.ContextVar("attention_policy", default=AUTO)


def policy_of(value: AttentionPolicy | str) -> AttentionPolicy:
    """An AttentionPolicy from itself or a mode name (ValueError naming the modes for an unknown one)."""
    if isinstance(value, AttentionPolicy):
        return value
    policy = _POLICIES.get(value)
    return policy if policy is not None else AttentionPolicy(value)


def attention_policy() -> AttentionPolicy:
    """The policy of the forward now running (`auto` outside one)."""
    return _current_policy.get()


@contextmanager
def use_attention_policy(policy: AttentionPolicy | str):
    """Every `attention` call inside the block without an explicit policy uses this one."""
    token = _current_policy.set(policy_of(policy))
    try:
        yield
    finally:
        _current_policy.reset(token)


# Beyond this many runs of equal key length, k_lens becomes a mask instead of one launch per run.
MAX_KEY_LENGTH_RUNS = 8


def exact_chain(device_type: str, capability: tuple[int, int] | None) -> tuple[str, ...]:
    """Exact kernels, fastest first, for a device (see the module docstring for the measurements)."""
    if device_type != "cuda":
        return ("sdpa_native", "sdpa_math")
    if capability is not None and capability >= (9, 0):
        return ("flash_attn_4", "sdpa_cudnn", "flash_attn", "sdpa_flash", "sdpa_efficient", "sdpa_math")
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
_refused: dict[tuple[str, Call], str] = {}     # (kernel, call) -> why it declined at run time (AttentionUnsupported)


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
# Routes: everything a call's signature decides, worked out once per signature
# ------------------------------------------------------------------------------------------------------------

# Pointer alignment enters a signature modulo this many bytes; every contract's align_bytes divides it, so two
# calls with equal signatures meet the same alignment rules (checked when a route is made).
ALIGNMENT_CLASS = 64
# The model makes a handful of signatures; a caller cycling through fresh ones only resets the cache.
MAX_ROUTES = 1024


@dataclass(frozen=True)
class _Route:
    call: Call
    scale: float
    segments: tuple[tuple[int, int, int], ...]    # (first batch item, end, key length): one kernel launch each
    masked: bool                                  # attn_mask and/or key lengths become one mask tensor
    kernel: Kernel                                # the first kernel in the chain whose contract covers the call
    passed_over: tuple[tuple[str, str, bool], ...]   # (kernel, reason, chosen) of those before it, logged once
    copies: tuple[tuple[bool, bool, bool], ...]   # per segment: whether q, k, v must be copied for `kernel`


_routes: dict[tuple, _Route] = {}
_routes_version = -1        # the TableVersion the cached routes were made with


def _validate(q, k, v):
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


def _check_mask(attn_mask: torch.Tensor, shape: tuple[int, int, int, int]) -> None:
    if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
        raise ValueError(f"attn_mask must be bool (True = attend) or additive float, got {attn_mask.dtype}")
    try:
        ok = torch.broadcast_shapes(attn_mask.shape, shape) == torch.Size(shape)
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to [B, H, Lq, Lk] = "
                         f"{list(shape)}")


def _mask(attn_mask, lens, shape, dtype, device) -> torch.Tensor | None:
    """attn_mask (checked by `_check_mask`) and key lengths as one mask broadcastable to `shape` = (B, H, Lq, Lk)."""
    mask = attn_mask
    if mask is not None:
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


def _tensor_signature(t: torch.Tensor) -> tuple:
    return t.dtype, t.shape, t.stride(), t.data_ptr() % ALIGNMENT_CLASS, t.device


def _signature(q, k, v, mode, lens, attn_mask, scale) -> tuple:
    """Everything `_make_route` reads: mode, scale, key lengths, mask metadata, and per tensor its dtype, shape,
    strides, pointer alignment class and device (the device fixes the GPU capability)."""
    mask = None if attn_mask is None else (attn_mask.dtype, attn_mask.shape)
    return mode, scale, lens, mask, _tensor_signature(q), _tensor_signature(k), _tensor_signature(v)


def _candidates(mode: str, call: Call):
    """(kernel, passed over) for each kernel able to serve `call`, in chain order; the kernels passed over on the
    way, as (name, reason, chosen), are logged once. A kernel the mode does not name is also passed over below
    its `auto_from_kv_len` (the next kernel is faster there)."""
    passed = []
    named = _MODE_HEADS[mode]
    for position, name in enumerate(kernel_chain(mode, call.device_type, call.capability)):
        kernel = KERNELS[name]
        # the contract first: it is cheap, and it spares importing a package that could not serve the call anyway
        reason = (kernel.contract.rejection(call) or _unavailable_reason(kernel)
                  or _refused.get((name, call)))
        if reason is None and name not in named and min(call.kv_lens) < kernel.contract.auto_from_kv_len:
            reason = f"key length < {kernel.contract.auto_from_kv_len}: the next kernel is faster there"
        if reason is None:
            yield kernel, tuple(passed)
            passed = []
        else:
            note = (name, reason, position == 0 and mode not in ("auto", "sdpa"))
            _note(mode, *note)
            passed.append(note)


def _make_route(q, k, v, mode, lens, attn_mask, scale) -> tuple[_Route, bool]:
    """The route of a call, and whether it may be cached (its kernel's alignment rule fits ALIGNMENT_CLASS)."""
    _validate(q, k, v)
    b, lq, hq, d = q.shape
    lk, hk = k.shape[1], k.shape[2]
    dtype = q.dtype if q.dtype.is_floating_point and q.dtype.itemsize >= 2 else torch.bfloat16
    scale = d ** -0.5 if scale is None else scale
    if attn_mask is not None:
        _check_mask(attn_mask, (b, hq, lq, lk))
    if lens is not None and attn_mask is None and len(_runs(lens)) <= MAX_KEY_LENGTH_RUNS:
        segments, masked = tuple(_runs(lens)), False
    else:
        segments, masked = ((0, b, lk),), attn_mask is not None or lens is not None
    call = Call(device_type=q.device.type, capability=_capability(q.device), dtype=dtype, head_dim=d,
                q_heads=hq, kv_heads=hk, kv_lens=tuple(n for _, _, n in segments), has_mask=masked,
                default_scale=abs(scale - d ** -0.5) <= 1e-12 * d ** -0.5,
                largest_numel=max(b * lq * hq, b * lk * hk) * d)
    kernel, passed_over = next(_candidates(mode, call))
    route = _Route(call, scale, segments, masked, kernel, passed_over, _copy_plan(kernel, q, k, v, call, segments))
    return route, ALIGNMENT_CLASS % kernel.contract.align_bytes == 0


def _route(q, k, v, mode, k_lens, attn_mask, scale) -> tuple[_Route, tuple[int, ...] | None]:
    """The call's route (cached per signature; its log lines replayed, so they still come once per reason) and
    its key lengths. Without k_lens this reads no tensor values: no host sync."""
    global _routes_version
    if scale is not None:
        scale = float(scale)
    lens = None
    if k_lens is not None:
        _validate(q, k, v)
        lens = _key_lengths(k_lens, q.shape[0], k.shape[1])
    key = _signature(q, k, v, mode, lens, attn_mask, scale)
    if TableVersion.value != _routes_version or len(_routes) >= MAX_ROUTES:
        if TableVersion.value != _routes_version:
            _refused.clear()   # refusals belong to the kernels that made them
        _routes.clear()
        _routes_version = TableVersion.value
    route = _routes.get(key)
    if route is None:
        route, cacheable = _make_route(q, k, v, mode, lens, attn_mask, scale)
        if cacheable:
            _routes[key] = route
    elif route.passed_over:
        for note in route.passed_over:
            _note(mode, *note)
    return route, lens


# ------------------------------------------------------------------------------------------------------------
# Running a kernel
# ------------------------------------------------------------------------------------------------------------

def _segment(q, k, v, segment, whole: tuple[int, int, int]):
    b0, b1, n = segment
    return (q, k, v) if segment == whole else (q[b0:b1], k[b0:b1, :n], v[b0:b1, :n])


def _in_layout(t: torch.Tensor, kernel: Kernel) -> torch.Tensor:
    return t.transpose(1, 2) if kernel.contract.layout == "HND" else t


def _copy_plan(kernel: Kernel, q, k, v, call: Call, segments) -> tuple[tuple[bool, bool, bool], ...]:
    """Per segment, whether each of q, k, v must be copied: a view serves when it meets the contract."""
    contract = kernel.contract
    fed = contract.feed_head_dim(call.head_dim)
    whole = (0, q.shape[0], k.shape[1])

    def must_copy(t, private):
        view = _in_layout(t, kernel)
        return (private or view.dtype != call.dtype or view.shape[-1] != fed
                or contract.layout_violation(view) is not None)

    return tuple((must_copy(qs, False), must_copy(ks, contract.clobbers_k), must_copy(vs, False))
                 for qs, ks, vs in (_segment(q, k, v, s, whole) for s in segments))


def _fed(t: torch.Tensor, kernel: Kernel, dtype: torch.dtype, head_dim: int, copy: bool) -> torch.Tensor:
    """`t` ([B, L, H, D]) as the kernel's contract wants it: a view when it complies, else ONE copy."""
    view = _in_layout(t, kernel)
    if not copy:
        return view
    for counter in _copy_counters:
        counter.count += 1
    shape = (*view.shape[:-1], head_dim)
    fresh = view.new_zeros(shape, dtype=dtype) if head_dim != view.shape[-1] else view.new_empty(shape, dtype=dtype)
    fresh[..., :view.shape[-1]].copy_(view)
    return fresh


def _run(kernel: Kernel, q, k, v, route: _Route, copies, mask) -> torch.Tensor:
    d = q.shape[-1]
    fed = kernel.contract.feed_head_dim(d)
    dtype = route.call.dtype
    hnd = kernel.contract.layout == "HND"
    if len(route.segments) == 1 and copies[0] == (False, False, False) and route.segments[0] == (0, q.shape[0],
                                                                                                k.shape[1]):
        # the hot path: views straight to the kernel (fed == d here: padding the head dim is a copy)
        if hnd:
            return kernel.run(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=route.scale,
                              mask=mask).transpose(1, 2)
        return kernel.run(q, k, v, scale=route.scale, mask=mask)
    whole = (0, q.shape[0], k.shape[1])
    outs = []
    for segment, (copy_q, copy_k, copy_v) in zip(route.segments, copies):
        qs, ks, vs = _segment(q, k, v, segment, whole)
        out = kernel.run(_fed(qs, kernel, dtype, fed, copy_q), _fed(ks, kernel, dtype, fed, copy_k),
                         _fed(vs, kernel, dtype, fed, copy_v), scale=route.scale, mask=mask)
        out = out.transpose(1, 2) if hnd else out
        outs.append(out if fed == d else out[..., :d])
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)


def _fall_back(mode: str, q, k, v, route: _Route, mask, declined: Kernel, err: AttentionUnsupported):
    """After `declined` raised AttentionUnsupported: remember it for this call signature (so the cached route
    is re-made without it), log once, and run the next kernel of the chain that serves the call."""
    while True:
        _refused[(declined.name, route.call)] = f"declined at run time: {err}"
        _note(mode, declined.name, f"declined at run time: {err}", chosen=True)
        _routes.clear()
        kernel = next((kernel for kernel, _ in _candidates(mode, route.call)), None)
        if kernel is None:
            raise RuntimeError(f"every attention kernel of mode {mode!r} declined the call; the last: {err}")
        try:
            return _run(kernel, q, k, v, route, _copy_plan(kernel, q, k, v, route.call, route.segments), mask)
        except AttentionUnsupported as again:
            declined, err = kernel, again


def _resolve(policy) -> str:
    return (_current_policy.get() if policy is None else policy_of(policy)).mode


def select_kernel(q, k, v, *, policy: AttentionPolicy | str | None = None, k_lens=None, attn_mask=None,
                  scale: float | None = None) -> str:
    """Name of the kernel `attention` would run for these inputs (before any run-time refusal)."""
    return _route(q, k, v, _resolve(policy), k_lens, attn_mask, scale)[0].kernel.name


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, policy: AttentionPolicy | str | None = None,
              k_lens: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
              scale: float | None = None) -> torch.Tensor:
    """Attention over `[B, L, H, D]` inputs; returns `[B, Lq, H, D]` in q's dtype. Inputs are never modified.

    policy: an AttentionPolicy or mode name; None = the running forward's (`use_attention_policy`), else `auto`.
    k_lens: `[B]` number of valid keys per batch item (the rest are padding).
    attn_mask: bool (True = attend) or additive float, broadcastable to `[B, H, Lq, Lk]`.
    scale: softmax scale, default head_dim ** -0.5.
    """
    mode = _resolve(policy)
    route, lens = _route(q, k, v, mode, k_lens, attn_mask, scale)
    mask = None
    if route.masked:
        b, lq, hq, _ = q.shape
        mask = _mask(attn_mask, lens, (b, hq, lq, k.shape[1]), route.call.dtype, q.device)
    if q.shape[1] == 0:
        return q.new_empty(q.shape)
    try:
        out = _run(route.kernel, q, k, v, route, route.copies, mask)
    except AttentionUnsupported as err:
        out = _fall_back(mode, q, k, v, route, mask, route.kernel, err)
    return out if out.dtype == q.dtype else out.to(q.dtype)
