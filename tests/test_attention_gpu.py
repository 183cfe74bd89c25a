"""Attention dispatch on a real GPU: every mode (whatever kernel ends up serving it) against float32 SDPA at Wan
shapes, plus small adversarial cases (named `small`, cheap enough for compute-sanitizer).

    python -m pytest tests/test_attention_gpu.py -q -rs
    compute-sanitizer --tool memcheck python -m pytest tests/test_attention_gpu.py -q -k small
"""
import logging

import pytest
import torch
import torch.nn.functional as F

from wantalk.wanvideo.modules import attention as dispatch
from wantalk.wanvideo.modules import attention_kernels as kernels
from wantalk.wanvideo.modules.attention import ATTENTION_MODES, attention, count_copies, select_kernel
from wantalk.wanvideo.modules.attention_kernels import CONTRACTS, KERNELS, installed_version

pytestmark = pytest.mark.gpu

EXACT_TOL = 1.5e-2      # bf16/fp16 outputs of exact kernels
QUANTIZED_TOL = {"sageattn": 4e-2, "sageattn_3_fp8": 4e-2, "sageattn_3": 0.2, "sageattn_3_fp4": 0.2,
                 "int8_triton": 5e-2}   # its contract note: about 3.6% at worst on zero-mean random V

# name: (batch, query tokens, key tokens, heads, head dim) - Wan 2.1 14B at 81 frames 480x832
WAN_SHAPES = {
    "self_32760": (1, 32760, 32760, 40, 128),
    "text_cross_512": (1, 32760, 512, 40, 128),
    "clip_cross_257": (1, 32760, 257, 40, 128),
    "audio_21x1560_32": (21, 1560, 32, 40, 128),
    "odd_4099_77": (2, 4099, 77, 40, 128),
}


def served_by(mode, q, k, v, **kw):
    return select_kernel(q, k, v, policy=mode, **kw)


def tolerance(kernel_name):
    return EXACT_TOL if CONTRACTS[kernel_name].exact else QUANTIZED_TOL[kernel_name]


@pytest.fixture(autouse=True)
def no_runtime_failures(caplog):
    """A kernel that passes its contract check and then declines (AttentionUnsupported) means the contract table
    is wrong; any other exception fails the test by itself."""
    dispatch._noted.clear()
    with caplog.at_level(logging.WARNING, logger="wantalk"):
        yield
    # caplog.records would hold only this teardown's records: the test body's are the "call" phase's
    failures = [r.getMessage() for r in caplog.get_records("call") if "declined at run time" in r.getMessage()]
    assert not failures, failures


def fp32_reference(q, k, v, rows, k_lens=None, attn_mask=None):
    """float32 SDPA (math backend, full fp32 matmuls) for the query rows `rows` only: attention rows are
    independent, so a sample of rows checks a 32k x 32k attention without a 32k x 32k score matrix."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    qs = q[:, rows].float().transpose(1, 2)
    ks, vs = k.float().transpose(1, 2), v.float().transpose(1, 2)
    mask = attn_mask[..., rows, :] if attn_mask is not None and attn_mask.shape[-2] > 1 else attn_mask
    if k_lens is not None:
        keep = (torch.arange(k.shape[1], device=q.device)[None] < k_lens[:, None])[:, None, None, :]
        mask = keep if mask is None else mask & keep
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask).transpose(1, 2)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def rel_err(out, ref):
    return ((out.float() - ref).norm() / ref.norm()).item()


def projections(b, lq, lk, h, d, dtype, seed=0):
    """q, k, v as the model makes them: views of linear outputs, [B, L, H, D]."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    make = lambda n: torch.randn(b, n, h * d, device="cuda", dtype=dtype, generator=g).view(b, n, h, d)
    return make(lq), make(lk), make(lk)


def math_fits(b, lq, lk, h):
    return b * h * lq * lk * 4 < 16e9   # the math backend materialises the score matrix


@pytest.mark.parametrize("shape", list(WAN_SHAPES))
@pytest.mark.parametrize("mode", ATTENTION_MODES)
def test_wan_shapes_against_fp32_sdpa(mode, shape):
    b, lq, lk, h, d = WAN_SHAPES[shape]
    q, k, v = projections(b, lq, lk, h, d, torch.bfloat16)
    kernel = served_by(mode, q, k, v)
    if kernel == "sdpa_math" and not math_fits(b, lq, lk, h):
        pytest.skip("math backend would need the full score matrix")
    k_before = k.clone()
    out = attention(q, k, v, policy=mode)
    rows = torch.randperm(lq, device="cuda")[:256]
    err = rel_err(out[:, rows], fp32_reference(q, k, v, rows))
    print(f"{mode:15s} {shape:18s} served by {kernel:15s} rel err {err:.4f}")
    assert out.shape == q.shape and out.dtype == q.dtype
    assert err < tolerance(kernel), (kernel, err)
    assert torch.equal(k, k_before)


@pytest.mark.parametrize("mode", ["auto", "sdpa", "sageattn", "flash_attn"])
def test_self_attention_with_key_lengths(mode):
    q, k, v = projections(2, 4099, 4099, 40, 128, torch.bfloat16, seed=1)
    k_lens = torch.tensor([4099, 3001], device="cuda")
    out = attention(q, k, v, policy=mode, k_lens=k_lens)
    rows = torch.randperm(4099, device="cuda")[:256]
    kernel = served_by(mode, q, k, v, k_lens=k_lens)
    assert rel_err(out[:, rows], fp32_reference(q, k, v, rows, k_lens=k_lens)) < tolerance(kernel)


def test_auto_prefers_cudnn_on_hopper():
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("cuDNN first only on sm90+")
    q, k, v = projections(1, 1024, 1024, 40, 128, torch.bfloat16)
    assert served_by("auto", q, k, v) == "sdpa_cudnn"
    assert served_by("auto", q, k, v, attn_mask=torch.ones(1024, 1024, dtype=torch.bool, device="cuda")) \
        == "sdpa_efficient"


def fa4_installed():
    return KERNELS["flash_attn_4"].unavailable() is None and torch.cuda.get_device_capability() in \
        CONTRACTS["flash_attn_4"].capabilities


def test_auto_uses_fa4_for_long_keys_when_installed():
    if not fa4_installed():
        pytest.skip("flash-attn-4 not installed, or not an sm90/sm100 GPU")
    n = CONTRACTS["flash_attn_4"].auto_from_kv_len
    q, k, v = projections(1, 4096, n, 40, 128, torch.bfloat16, seed=4)
    assert served_by("auto", q, k, v) == "flash_attn_4"
    assert served_by("auto", q, k[:, :n - 1], v[:, :n - 1]) == "sdpa_cudnn"
    rows = torch.randperm(4096, device="cuda")[:256]
    assert rel_err(attention(q, k, v)[:, rows], fp32_reference(q, k, v, rows)) < EXACT_TOL


@pytest.mark.parametrize("shape", list(WAN_SHAPES))
def test_fa4_tuned_config_at_wan_shapes_against_fp32_sdpa(shape, monkeypatch, caplog):
    """The tile config listed for this GPU really compiles (no fallback to FA4's own) and is exact at every Wan
    shape, key lengths shorter than a tile included."""
    if not fa4_installed():
        pytest.skip("flash-attn-4 not installed, or not an sm90/sm100 GPU")
    b, lq, lk, h, d = WAN_SHAPES[shape]
    q, k, v = projections(b, lq, lk, h, d, torch.bfloat16)
    if (torch.cuda.get_device_capability(), q.dtype, d, 1) not in kernels.FA4_TUNED_CONFIGS:
        pytest.skip("no tuned FlashAttention-4 config listed for this GPU")
    monkeypatch.setattr(kernels, "_fa4_compiled", {})
    with caplog.at_level(logging.INFO, logger="wantalk"):
        out = attention(q, k, v, policy="flash_attn_4")
    assert served_by("flash_attn_4", q, k, v) == "flash_attn_4"
    messages = [r.getMessage() for r in caplog.records]
    assert any("tuned config" in m for m in messages) and not any("refused its tuned config" in m for m in messages)
    rows = torch.randperm(lq, device="cuda")[:256]
    assert rel_err(out[:, rows], fp32_reference(q, k, v, rows)) < EXACT_TOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("kv_heads", [8, 2, 1])
def test_small_fa4_gqa_head_dims_dtypes(dtype, d, kv_heads):
    if not fa4_installed():
        pytest.skip("flash-attn-4 not installed, or not an sm90/sm100 GPU")
    g = torch.Generator(device="cuda").manual_seed(13)
    q = torch.randn(2, 300, 8, d, device="cuda", dtype=dtype, generator=g)
    k, v = (torch.randn(2, 333, kv_heads, d, device="cuda", dtype=dtype, generator=g) for _ in range(2))
    assert served_by("flash_attn_4", q, k, v) == "flash_attn_4"
    out = attention(q, k, v, policy="flash_attn_4", scale=0.1)
    rep = 8 // kv_heads
    ref = F.scaled_dot_product_attention(q.float().transpose(1, 2), k.float().repeat_interleave(rep, 2).transpose(1, 2),
                                         v.float().repeat_interleave(rep, 2).transpose(1, 2), scale=0.1)
    assert rel_err(out, ref.transpose(1, 2)) < EXACT_TOL


def test_sageattention_pypi_bug_is_routed_around():
    version = installed_version("sageattention")
    if version is None or KERNELS["sageattn"].unavailable() is not None:
        pytest.skip("sageattention not installed")
    q, k, v = projections(21, 1560, 32, 40, 128, torch.bfloat16, seed=2)
    if version <= (1, 0, 6):
        assert served_by("sageattn", q, k, v) != "sageattn"
    q2, k2, v2 = projections(1, 4096, 512, 40, 128, torch.bfloat16, seed=3)
    assert served_by("sageattn", q2, k2, v2) == "sageattn"


# ---------------------------------------------------------------------------------------------------------------
# small cases: adversarial layouts, masks, key lengths on every mode (run under compute-sanitizer)
# ---------------------------------------------------------------------------------------------------------------

def _small_inputs(layout, dtype, lq=77, lk=65, b=2, h=4, d=64):
    g = torch.Generator(device="cuda").manual_seed(7)
    rand = lambda *s: torch.randn(*s, device="cuda", dtype=dtype, generator=g)
    if layout == "contiguous":
        return rand(b, lq, h, d), rand(b, lk, h, d), rand(b, lk, h, d)
    if layout == "hnd_storage":
        return tuple(rand(b, h, n, d).transpose(1, 2) for n in (lq, lk, lk))
    if layout == "misaligned":
        return tuple(rand(b * n * h * d + 1)[1:].view(b, n, h, d) for n in (lq, lk, lk))
    if layout == "fused_qkv":
        q = rand(b, lq, h * d).view(b, lq, h, d)
        k, v = rand(b, lk, 2 * h * d).unflatten(-1, (2, h, d)).unbind(2)
        return q, k, v
    if layout == "tail_slice":
        return tuple(rand(b, n + 5, h * d + 3)[:, -n:, 3:].unflatten(-1, (h, d)) for n in (lq, lk, lk))
    raise ValueError(layout)


@pytest.mark.parametrize("layout", ["contiguous", "hnd_storage", "misaligned", "fused_qkv", "tail_slice"])
@pytest.mark.parametrize("mode", ATTENTION_MODES)
def test_small_layouts(mode, layout):
    # Lk 1: cuDNN refuses it; Lk 128: the one length sageattention 1.0.6 gets right here
    for lk, dtype in ((1, torch.float16), (32, torch.bfloat16), (65, torch.float16), (128, torch.float16),
                      (257, torch.bfloat16)):
        q, k, v = _small_inputs(layout, dtype, lk=lk)
        before = [t.clone() for t in (q, k, v)]
        with count_copies() as copies:
            out = attention(q, k, v, policy=mode)
        kernel = served_by(mode, q, k, v)
        err = rel_err(out, fp32_reference(q, k, v, torch.arange(q.shape[1], device="cuda")))
        assert err < tolerance(kernel), (kernel, dtype, lk, err)
        assert copies.count <= 3
        assert all(torch.equal(t, b) for t, b in zip((q, k, v), before))


@pytest.mark.parametrize("mode", ATTENTION_MODES)
def test_small_masks_and_key_lengths(mode):
    q, k, v = _small_inputs("fused_qkv", torch.bfloat16, lq=50, lk=100)
    g = torch.Generator(device="cuda").manual_seed(11)
    keep = torch.rand(2, 1, 50, 100, device="cuda", generator=g) > 0.3
    keep[..., 0] = True
    k_lens = torch.tensor([100, 37], device="cuda")
    rows = torch.arange(50, device="cuda")
    for kwargs in ({"k_lens": k_lens}, {"attn_mask": keep}, {"attn_mask": keep, "k_lens": k_lens}):
        out = attention(q, k, v, policy=mode, **kwargs)
        kernel = served_by(mode, q, k, v, **kwargs)
        ref = fp32_reference(q, k, v, rows, **kwargs)
        assert rel_err(out, ref) < tolerance(kernel), (kernel, list(kwargs))


@pytest.mark.parametrize("backend", ["sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "sdpa_math"])
def test_small_pinned_sdpa_backends_really_run(backend):
    q, k, v = _small_inputs("contiguous", torch.bfloat16, lq=300, lk=300, h=8, d=128)
    assert served_by(backend, q, k, v) == backend
    out = attention(q, k, v, policy=backend)
    assert rel_err(out, fp32_reference(q, k, v, torch.arange(300, device="cuda"))) < EXACT_TOL
