"""Attention kernels and their contracts, in one table.

A contract states exactly which inputs a kernel handles correctly and safely: layout, strides, alignment,
dtypes, head dims, key-length rules, masks, GQA, scale, side effects and GPU capability. The dispatcher in
`attention.py` only ever hands a kernel tensors that meet its contract (copying once when they don't) and
routes any call the kernel cannot serve correctly to the next kernel. The adapters below are thin: they
receive q, k, v already in their contract's layout and dtype and return the output in that same layout.

An adapter that cannot serve a call it was handed (a refusal the contract could not foresee: a pinned SDPA backend
answering "No available kernel", FlashAttention-4 refusing or failing to compile a shape family) raises
`AttentionUnsupported`; the dispatcher then logs it once and uses the next kernel. Every other exception is a bug
and surfaces to the caller.

Facts behind the table: docs/NOTES.md §5 (sageattention 1.0.6 key-length bug and in-place
`k -= km`, SageAttention3 sm120/121 only, 16-byte vector loads; FlashAttention-4 in §5.2) and the PyTorch
issue tracker (cuDNN SDPA:
silently wrong with float masks of another dtype, pytorch#191612; wrong with GQA on sm100, pytorch#193893;
mask-dependent failures, pytorch#134001, #196678; memory-efficient SDPA wrong on stride-0 k/v, #191937).
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger("wantalk")

HALF = (torch.float16, torch.bfloat16)
FLOAT = (torch.float16, torch.bfloat16, torch.float32)
ANY_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class AttentionUnsupported(Exception):
    """A kernel declines a call at run time (not a bug): the dispatcher falls back to the next kernel."""


@dataclass(frozen=True)
class Call:
    """What the dispatcher knows about one attention call, in terms a contract can judge."""
    device_type: str
    capability: tuple[int, int] | None
    dtype: torch.dtype                # compute dtype (the caller's q dtype, or bf16 for non-float q)
    head_dim: int
    q_heads: int
    kv_heads: int
    kv_lens: tuple[int, ...]          # key length of every kernel launch (several when k_lens is sliced)
    has_mask: bool                    # an explicit attn_mask, or k_lens the kernel must apply itself
    default_scale: bool               # scale == head_dim ** -0.5
    largest_numel: int                # largest q/k/v element count


@dataclass(frozen=True)
class Contract:
    """Inputs a kernel serves correctly. Anything else is copied (layout) or routed elsewhere (the rest)."""
    layout: str                                   # "HND" = [B, H, L, D]; "NHD" = [B, L, H, D]
    dtypes: tuple[torch.dtype, ...]
    max_head_dim: int | None = None
    head_dim_multiple: int = 1
    head_dims: tuple[int, ...] | None = None      # only these head dims are run ...
    pads_head_dim: bool = False                   # ... smaller ones are zero-padded up (exact with custom scale)
    contiguity: str = "last"                      # "none", "last" (stride(-1) == 1) or "full"
    align_bytes: int = 16                         # base pointer and strides of dims with extent > 1
    broadcast_ok: bool = False                    # stride-0 (expanded) dims allowed
    max_numel: int | None = None                  # int32 element offsets inside the kernel
    kv_len_multiple: int = 1                      # correct only when every key length is a multiple
    min_kv_len: int = 1                           # shorter key lengths are refused by the kernel
    faster_from_kv_len: int = 1                   # approximate kernels: below this key length an exact kernel is
                                                  # faster (measured), so even a pinned mode passes the call on
    auto_from_kv_len: int = 1                     # exact kernels early in a chain: below this key length the next
                                                  # kernel is faster (measured); only a mode naming it runs it there
    masks: bool = False                           # additive/bool attn_mask honoured
    gqa: bool = False                             # fewer k/v heads than q heads
    custom_scale: bool = True
    clobbers_k: bool = False                      # writes into k: always gets a private copy
    devices: tuple[str, ...] = ("cuda",)
    min_capability: tuple[int, int] | None = None
    capabilities: tuple[tuple[int, int], ...] | None = None   # exact list, when not a minimum
    exact: bool = True                            # False: quantizes internally (approximate by design)

    def feed_head_dim(self, head_dim: int) -> int | None:
        """The head dim the kernel is fed (head_dim, or the padded size), None if it cannot serve it."""
        if self.head_dims is not None:
            fits = [d for d in self.head_dims if d >= head_dim] if self.pads_head_dim else \
                   [d for d in self.head_dims if d == head_dim]
            return min(fits) if fits else None
        if self.max_head_dim is not None and head_dim > self.max_head_dim:
            return None
        return head_dim if head_dim % self.head_dim_multiple == 0 else None

    def rejection(self, call: Call) -> str | None:
        """Why this kernel cannot serve the call correctly (a stable phrase, logged once), or None."""
        if call.device_type not in self.devices:
            return f"runs on {'/'.join(self.devices)} only"
        if call.device_type == "cuda":
            cap = call.capability
            if self.capabilities is not None and cap not in self.capabilities:
                return "needs GPU capability " + "/".join(f"sm{a}{b}" for a, b in self.capabilities)
            if self.min_capability is not None and (cap is None or cap < self.min_capability):
                return "needs GPU capability >= sm{}{}".format(*self.min_capability)
        if call.dtype not in self.dtypes:
            return f"dtype {call.dtype} unsupported"
        fed = self.feed_head_dim(call.head_dim)
        if fed is None:
            return f"head_dim {call.head_dim} unsupported"
        if fed != call.head_dim and not self.custom_scale:
            return "head_dim padding needs a custom scale"
        if self.contiguity != "none" and (fed * call.dtype.itemsize) % self.align_bytes:
            return f"head_dim {call.head_dim} rows not {self.align_bytes}-byte aligned"
        if call.q_heads != call.kv_heads and not self.gqa:
            return "grouped-query attention unsupported"
        if call.has_mask and not self.masks:
            return "masks unsupported"
        if not call.default_scale and not self.custom_scale:
            return "custom scale unsupported"
        if any(n % self.kv_len_multiple for n in call.kv_lens):
            return f"wrong results when key length % {self.kv_len_multiple} != 0"
        if min(call.kv_lens) < self.min_kv_len:
            return f"key length < {self.min_kv_len} unsupported"
        if min(call.kv_lens) < self.faster_from_kv_len:
            return f"key length < {self.faster_from_kv_len}: an exact kernel is faster there"
        if self.max_numel is not None and call.largest_numel * fed // call.head_dim >= self.max_numel:
            return "tensor too large for 32-bit indexing"
        return None

    def layout_violation(self, t: torch.Tensor) -> str | None:
        """Why tensor `t` (already in this contract's layout) must be copied before the kernel sees it."""
        if t.dtype not in self.dtypes:
            return "dtype"
        if not self.broadcast_ok and any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape)):
            return "broadcast (stride 0) dim"
        if self.contiguity == "full" and not t.is_contiguous():
            return "not contiguous"
        if self.contiguity == "last" and t.shape[-1] > 1 and t.stride(-1) != 1:
            return "last dim not contiguous"
        if self.contiguity != "none":
            size = t.element_size()
            if t.data_ptr() % self.align_bytes:
                return "base pointer misaligned"
            if any((st * size) % self.align_bytes for st, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1):
                return "stride misaligned"
        if self.max_numel is not None:
            span = 1 + sum((n - 1) * abs(st) for st, n in zip(t.stride(), t.shape))
            if span >= self.max_numel:
                return "span beyond 32-bit indexing"
        return None


@dataclass(frozen=True)
class Kernel:
    """A contract plus the adapter that runs it. `run(q, k, v, *, scale, mask)` gets contract-layout tensors."""
    name: str
    contract: Contract
    run: Callable[..., torch.Tensor]
    unavailable: Callable[[], str | None] = lambda: None   # None when usable, else why not (logged once)


# ------------------------------------------------------------------------------------------------------------
# Optional packages
# ------------------------------------------------------------------------------------------------------------

def _import(name: str):
    try:
        return importlib.import_module(name)
    except Exception:   # a broken optional install (missing CUDA symbols, Triton errors) is "absent"
        return None


def installed_version(dist: str) -> tuple[int, ...] | None:
    """Version tuple of an installed distribution (numeric parts only), None when absent."""
    try:
        text = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None
    parts = []
    for piece in text.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def sageattention_is_buggy(version: tuple[int, ...] | None) -> bool:
    """sageattention <= 1.0.6 (the PyPI release) is wrong for key lengths % 64 != 0 and clobbers k."""
    return version is None or version <= (1, 0, 6)


# ------------------------------------------------------------------------------------------------------------
# Adapters
# ------------------------------------------------------------------------------------------------------------

# Phrases of PyTorch/cuDNN errors that mean "this backend does not take these inputs" (a refusal, not a bug).
_SDPA_REFUSALS = ("No available kernel", "No valid execution plans", "CUDNN_STATUS_NOT_SUPPORTED")


def _refusal(err: RuntimeError) -> AttentionUnsupported | None:
    text = str(err)
    return AttentionUnsupported(text.splitlines()[0][:200]) if any(p in text for p in _SDPA_REFUSALS) else None


@contextmanager
def _sdpa_refusals_decline():
    """A pinned SDPA backend refusing its inputs becomes AttentionUnsupported; any other error stays itself."""
    try:
        yield
    except RuntimeError as err:
        refusal = _refusal(err)
        if refusal is None:
            raise
        raise refusal from err


def _sdpa(backend_name: str | None):
    """SDPA pinned to one backend (None: PyTorch's own choice, used on CPU only)."""
    def run(q, k, v, *, scale, mask):
        gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
        if backend_name is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, **gqa)
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with _sdpa_refusals_decline(), sdpa_kernel(getattr(SDPBackend, backend_name)):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, **gqa)
    return run


def _sdpa_direct(op_name: str, with_bias: bool):
    """cuDNN / flash SDPA called through its ATen op: no per-call `sdpa_kernel` context and no backend choice
    (the contract already decided), for the calls that need no mask and no GQA; others take `_sdpa`."""
    general = _sdpa("CUDNN_ATTENTION" if "cudnn" in op_name else "FLASH_ATTENTION")

    def run(q, k, v, *, scale, mask):
        if mask is not None or q.shape[1] != k.shape[1]:
            return general(q, k, v, scale=scale, mask=mask)
        op = getattr(torch.ops.aten, op_name)
        with _sdpa_refusals_decline():
            out = op(q, k, v, None, False, scale=scale) if with_bias else op(q, k, v, scale=scale)
        return out[0]
    return run


def _cudnn_unavailable():
    # ROCm builds have no cuDNN attention op: calling it would be an error, not a decline
    return "cuDNN not available in this torch build" if torch.version.hip or not torch.backends.cudnn.is_available() \
        else None


def _flash_module():
    return _import("flash_attn_interface") or _import("flash_attn")


def _flash_attn(q, k, v, *, scale, mask):
    out = _flash_module().flash_attn_func(q, k, v, softmax_scale=scale, causal=False)
    return out[0] if isinstance(out, tuple) else out   # FA3 returns (out, lse) in some versions


def _sageattn(q, k, v, *, scale, mask):
    return _import("sageattention").sageattn(q, k, v, tensor_layout="NHD", is_causal=False, sm_scale=scale)


def _sageattn_fp8(q, k, v, *, scale, mask):
    sage = _import("sageattention")
    if torch.cuda.get_device_capability(q.device) == (9, 0):
        return sage.sageattn_qk_int8_pv_fp8_cuda_sm90(q, k, v, tensor_layout="NHD", sm_scale=scale,
                                                      pv_accum_dtype="fp32+fp32")
    return sage.sageattn_qk_int8_pv_fp8_cuda(q, k, v, tensor_layout="NHD", sm_scale=scale,
                                             pv_accum_dtype="fp32+fp16")


def _int8_triton(q, k, v, *, scale, mask):
    from ..kernels.sage_int8 import sage_int8_attention
    return sage_int8_attention(q, k, v, scale=scale)


def _int8_triton_unavailable():
    from ..kernels.sage_int8 import unavailable
    return unavailable()


def _fa4_module():
    return _import("flash_attn.cute")


def _fa4_unavailable():
    if _fa4_module() is None:
        return "flash-attn-4 not installed (optional extra `fa4`: pip install 'wantalk[fa4]')"
    return None


# FlashAttention-4's forward tile config where one measured faster than its own choice, per (GPU capability, dtype,
# head dim, q heads per k/v head): keyword arguments of `flash_attn.cute.interface._flash_attn_fwd`. H200, bf16, H40
# D128 self-attention (bench/fa4_tiles.py, docs/BENCHMARKS.md): three MMA warpgroups on 192x128 tiles, P.V from
# registers, no intra-warpgroup overlap ran 1.029x FA4's own 128x128 choice at 32,760 tokens (702 TFLOP/s) and 1.041x
# at 75,600 (run-to-run noise about 1.5%), same error; of the 2-warpgroup configs none beat FA4's own. Only the
# measured case is listed (sm100, fp16, GQA and other head dims keep FA4's choice); FA4 refusing it is a logged
# fallback to its own config.
FA4_TUNED_CONFIGS: dict[tuple, dict] = {
    ((9, 0), torch.bfloat16, 128, 1): dict(tile_mn=(192, 128), mma_pv_is_rs=True, intra_wg_overlap=False),
}

# FlashAttention-4 JIT-compiles one kernel per family (dtype, head dim, q heads per k/v head, device) on its first
# call in a process (H200: 1.8-2.8 s, the package import included); later calls of the family, any sequence length,
# run at once (0.5-5 ms first calls measured). Family -> the call that compiled for it (tuned or FA4's own config).
_fa4_compiled: dict[tuple, Callable] = {}


def _capability(device: torch.device) -> tuple[int, int] | None:
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def _fa4_default(q, k, v, scale):
    return _fa4_module().flash_attn_func(q, k, v, softmax_scale=scale, causal=False)


def _fa4_tuned(config: dict):
    """FA4's forward with a tile config: its public function takes none, so the internal forward it wraps is
    called (inference only: no autograd graph is built)."""
    def call(q, k, v, scale):
        interface = _import("flash_attn.cute.interface")
        return interface._flash_attn_fwd(q, k, v, softmax_scale=scale, causal=False, **config)
    return call


def _fa4_first_call(call, config: dict | None, q, k, v, scale):
    """The first call of a family is its JIT compile: a refusal (assert) or a failed build is AttentionUnsupported."""
    start = time.perf_counter()
    try:
        out = call(q, k, v, scale)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as err:
        first_line = (str(err).splitlines() or [""])[0][:200]
        raise AttentionUnsupported(f"refused or failed to compile {type(err).__name__}: {first_line}") from err
    log.info("FlashAttention-4: first call of %s, head dim %d, %d q heads per k/v head, %s took %.1f s (JIT "
             "compile, once per process)", q.dtype, q.shape[-1], q.shape[2] // k.shape[2],
             f"tuned config {config}" if config else "its own config", time.perf_counter() - start)
    return out


def _fa4_compile(q, k, v, scale):
    """Compile the family with its tuned config if one is listed, else (or when FA4 refuses it) FA4's own config.
    Returns the first output and the call that produced it."""
    config = FA4_TUNED_CONFIGS.get((_capability(q.device), q.dtype, q.shape[-1], q.shape[2] // k.shape[2]))
    if config is not None:
        tuned = _fa4_tuned(config)
        try:
            return _fa4_first_call(tuned, config, q, k, v, scale), tuned
        except AttentionUnsupported as err:
            log.warning("FlashAttention-4 refused its tuned config %s (%s): using its own config", config, err)
    return _fa4_first_call(_fa4_default, None, q, k, v, scale), _fa4_default


def _flash_attn_4(q, k, v, *, scale, mask):
    family = (q.dtype, q.shape[-1], q.shape[2] // k.shape[2], q.device)
    call = _fa4_compiled.get(family)
    if call is not None:
        out = call(q, k, v, scale)
    else:
        out, _fa4_compiled[family] = _fa4_compile(q, k, v, scale)
    return out[0] if isinstance(out, tuple) else out


def _sageattn3(per_block_mean: bool):
    def run(q, k, v, *, scale, mask):
        return _import("sageattn3").sageattn3_blackwell(q, k, v, per_block_mean=per_block_mean)
    return run


def _needs(module: str, attr: str | None = None, what: str | None = None):
    def unavailable():
        mod = _import(module)
        if mod is None or (attr is not None and not hasattr(mod, attr)):
            return f"{what or module} not installed"
        return None
    return unavailable


def _flash_unavailable():
    # FlashAttention-4 installs `flash_attn.cute` into a `flash_attn` namespace package without flash_attn_func
    module = _flash_module()
    return None if module is not None and hasattr(module, "flash_attn_func") else "flash_attn not installed"


# ------------------------------------------------------------------------------------------------------------
# The table
# ------------------------------------------------------------------------------------------------------------

_SAGE_COMMON = dict(layout="NHD", dtypes=HALF, contiguity="last", align_bytes=16, max_numel=2 ** 31,
                    gqa=True, exact=False)

CONTRACTS: dict[str, Contract] = {
    # cuDNN: fastest on sm90; routed away from masks and GQA (silent-wrong-result reports, see module doc).
    # Probed on H100 (torch 2.11, cuDNN 9.19): a base pointer or a stride that is not a multiple of 16 bytes
    # gives silently WRONG output (rel. err ~1.4), so the 16-byte rule is load-bearing; key length 1 is
    # refused at run time ("No available kernel"); stride-0 k/v and any dim order of b/h/l are fine.
    "sdpa_cudnn": Contract(layout="HND", dtypes=HALF, max_head_dim=128, head_dim_multiple=8, min_kv_len=2,
                           min_capability=(8, 0)),
    "sdpa_flash": Contract(layout="HND", dtypes=HALF, max_head_dim=256, head_dim_multiple=8, gqa=True,
                           min_capability=(8, 0)),
    "sdpa_efficient": Contract(layout="HND", dtypes=FLOAT, head_dim_multiple=8, masks=True,
                               min_capability=(5, 0)),
    "sdpa_math": Contract(layout="HND", dtypes=ANY_FLOAT, contiguity="none", align_bytes=1, broadcast_ok=True,
                          masks=True, gqa=True, devices=("cuda", "cpu")),
    "sdpa_native": Contract(layout="HND", dtypes=ANY_FLOAT, contiguity="none", align_bytes=1, broadcast_ok=True,
                            masks=True, gqa=True, devices=("cpu",)),
    "flash_attn": Contract(layout="NHD", dtypes=HALF, max_head_dim=256, head_dim_multiple=8, gqa=True,
                           min_capability=(8, 0)),
    # FlashAttention-4 (`flash-attn-4` 4.0.0b36, CuTe DSL, docs/NOTES.md §5.2): q, k, v [B, L, H, D] fp16/bf16, last
    # dim contiguous, base pointer and strides 16-byte aligned (else it copies them itself: we copy once instead),
    # GQA, any scale, no masks here (its mask_mod is not used). Head dims 8..256 on sm90 but 8..128 on sm100: 128
    # is the common limit. FP8 inputs only on sm100, never fed. H200, bf16, H40 D128 (docs/BENCHMARKS.md, issue 16):
    # self-attention 1.01x cuDNN at 4,096 tokens, 1.08x at 8,190, 1.19x at 32,760; 0.79x at 2,048; 32,760 queries
    # over 1,024 / 2,048 / 4,096 keys 0.80x / 0.91x / 1.00x; <= 512 keys 0.58-0.86x. Hence `auto` from 4,096 keys.
    # Its tile config: FA4_TUNED_CONFIGS above.
    "flash_attn_4": Contract(layout="NHD", dtypes=HALF, max_head_dim=128, head_dim_multiple=8, gqa=True,
                             max_numel=2 ** 31, capabilities=((9, 0), (10, 0), (10, 3)), auto_from_kv_len=4096),
    # PyPI sageattention <= 1.0.6 (Triton): wrong unless Lk % 64 == 0; `k -= km` in place; D in {64, 96, 128};
    # GQA not claimed by that release.
    "sageattn_legacy": Contract(**{**_SAGE_COMMON, "gqa": False}, head_dims=(64, 96, 128), pads_head_dim=True,
                                kv_len_multiple=64, clobbers_k=True, min_capability=(8, 0)),
    # sageattention >= 2: pads head dims <= 128 itself, masks padded keys, no in-place writes.
    "sageattn": Contract(**_SAGE_COMMON, max_head_dim=128,
                         capabilities=((8, 0), (8, 6), (8, 9), (9, 0), (12, 0), (12, 1))),
    "sageattn_3_fp8": Contract(**_SAGE_COMMON, max_head_dim=128,
                               capabilities=((8, 9), (9, 0), (12, 0), (12, 1))),
    # SageAttention3 (FP4 microscaling): HND only, scale fixed at D^-0.5, mask ignored, `k -= mean` in place.
    "sageattn_3": Contract(layout="HND", dtypes=HALF, head_dims=(64, 128), contiguity="full", align_bytes=16,
                           custom_scale=False, clobbers_k=True, capabilities=((12, 0), (12, 1)), exact=False),
    # The pack's own 8-bit Triton kernel (wanvideo/kernels/sage_int8.py): INT8 Q.K, FP8 P.V from sm89 (FP16 P.V
    # on sm80/86), any key length (padded keys masked), int64 offsets, reads any b/l/h strides, never writes
    # its inputs. Error vs float32: see docs/BENCHMARKS.md (about 3.6% at worst on zero-mean random V).
    # H100, 40 heads, self-attention: 0.89x cuDNN at 4096 keys, 1.09x at 8192, 1.35x at 32760 (the 8-bit copies
    # cost O(L), the attention O(L^2)); text/CLIP/audio cross-attention (<= 512 keys) runs 0.3-0.6x cuDNN.
    "int8_triton": Contract(layout="NHD", dtypes=HALF, head_dims=(64, 128), pads_head_dim=True, contiguity="last",
                            align_bytes=2, gqa=True, min_capability=(8, 0), exact=False, faster_from_kv_len=8192),
}
CONTRACTS["sageattn_3_fp4"] = CONTRACTS["sageattn_3"]


def _sage_kernel() -> Kernel:
    buggy = sageattention_is_buggy(installed_version("sageattention"))
    return Kernel("sageattn", CONTRACTS["sageattn_legacy" if buggy else "sageattn"], _sageattn,
                  _needs("sageattention"))


KERNELS: dict[str, Kernel] = {
    "sdpa_cudnn": Kernel("sdpa_cudnn", CONTRACTS["sdpa_cudnn"],
                         _sdpa_direct("_scaled_dot_product_cudnn_attention", with_bias=True), _cudnn_unavailable),
    "sdpa_flash": Kernel("sdpa_flash", CONTRACTS["sdpa_flash"],
                         _sdpa_direct("_scaled_dot_product_flash_attention", with_bias=False)),
    "sdpa_efficient": Kernel("sdpa_efficient", CONTRACTS["sdpa_efficient"], _sdpa("EFFICIENT_ATTENTION")),
    "sdpa_math": Kernel("sdpa_math", CONTRACTS["sdpa_math"], _sdpa("MATH")),
    "sdpa_native": Kernel("sdpa_native", CONTRACTS["sdpa_native"], _sdpa(None)),
    "flash_attn": Kernel("flash_attn", CONTRACTS["flash_attn"], _flash_attn, _flash_unavailable),
    "flash_attn_4": Kernel("flash_attn_4", CONTRACTS["flash_attn_4"], _flash_attn_4, _fa4_unavailable),
    "sageattn": _sage_kernel(),
    "sageattn_3_fp8": Kernel("sageattn_3_fp8", CONTRACTS["sageattn_3_fp8"], _sageattn_fp8,
                             _needs("sageattention", "sageattn_qk_int8_pv_fp8_cuda", "sageattention>=2")),
    "sageattn_3": Kernel("sageattn_3", CONTRACTS["sageattn_3"], _sageattn3(True), _needs("sageattn3")),
    "sageattn_3_fp4": Kernel("sageattn_3_fp4", CONTRACTS["sageattn_3_fp4"], _sageattn3(False),
                             _needs("sageattn3")),
    "int8_triton": Kernel("int8_triton", CONTRACTS["int8_triton"], _int8_triton, _int8_triton_unavailable),
}


class TableVersion:
    """Bumped whenever `stand_in_kernels` changes KERNELS: the dispatcher's cached routes are dropped then."""
    value = 0


@contextmanager
def stand_in_kernels(*kernels: Kernel):
    """Temporarily replace (or add) kernels by name: tests plug in recording fakes with real contracts."""
    saved = {k.name: KERNELS.get(k.name) for k in kernels}
    KERNELS.update({k.name: k for k in kernels})
    TableVersion.value += 1
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                KERNELS.pop(name, None)
            else:
                KERNELS[name] = old
        TableVersion.value += 1


def on_cpu(contract: Contract) -> Contract:
    """The same contract, made runnable on CPU (for stand-in kernels in tests)."""
    return dataclasses.replace(contract, devices=("cpu",), min_capability=None, capabilities=None)
