"""Attention dispatch on CPU: recording stand-in kernels carrying the REAL contracts check that every kernel
only ever sees what its contract allows, that copies are the minimum, that caller tensors are untouched, and
that every path (served, sliced by k_lens, masked, fallen back) equals a float64 reference."""
import itertools
import logging

import pytest
import torch

from wantalk.wanvideo.modules import attention as dispatch
from wantalk.wanvideo.modules import attention_kernels as kernels
from wantalk.wanvideo.modules.attention import ATTENTION_MODES, attention, count_copies, kernel_chain, select_kernel
from wantalk.wanvideo.modules.attention_kernels import CONTRACTS, Kernel, on_cpu, stand_in_kernels

TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float64: 1e-10}

# stand-in name -> (registry name it replaces, mode whose chain starts with it)
ROLES = {
    "sdpa_cudnn": ("sdpa_cudnn", "sdpa_cudnn"),
    "sdpa_flash": ("sdpa_flash", "sdpa_flash"),
    "sdpa_efficient": ("sdpa_efficient", "sdpa_efficient"),
    "flash_attn": ("flash_attn", "flash_attn"),
    "sageattn_legacy": ("sageattn", "sageattn"),
    "sageattn": ("sageattn", "sageattn"),
    "sageattn_3": ("sageattn_3", "sageattn_3"),
}


# ---------------------------------------------------------------------------------------------------------------
# float64 reference and the recording stand-in
# ---------------------------------------------------------------------------------------------------------------

def dense_f64(q, k, v, scale, mask=None):
    """Plain attention in float64 over HND tensors; GQA by repeating k/v heads."""
    rep = q.shape[1] // k.shape[1]
    q, k, v = q.double(), k.double(), v.double()
    if rep > 1:
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = q @ k.transpose(-1, -2) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.double()
    return scores.softmax(-1) @ v


def reference(q, k, v, scale=None, attn_mask=None, k_lens=None):
    """float64 attention of [B, L, H, D] inputs with mask and key lengths applied explicitly."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    lk = k.shape[1]
    mask = attn_mask
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.double()
    if k_lens is not None:
        keep = (torch.arange(lk)[None, :] < torch.as_tensor(k_lens)[:, None])[:, None, None, :]
        mask = keep if mask is None else (mask & keep if mask.dtype == torch.bool
                                          else mask.masked_fill(~keep, float("-inf")))
    return dense_f64(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale, mask).transpose(1, 2)


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def complaints(contract, t):
    """Independent check of a tensor a kernel received against its contract (the test's own oracle)."""
    found = []
    if t.dtype not in contract.dtypes:
        found.append("dtype")
    if any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape)) and not contract.broadcast_ok:
        found.append("broadcast")
    if contract.contiguity == "full" and not t.is_contiguous():
        found.append("contiguity")
    if contract.contiguity in ("last", "full") and t.stride(-1) != 1:
        found.append("last stride")
    if contract.align_bytes > 1:
        if t.data_ptr() % contract.align_bytes:
            found.append("base alignment")
        if any(st * t.element_size() % contract.align_bytes for st, n in zip(t.stride()[:-1], t.shape) if n > 1):
            found.append("stride alignment")
    return found


def stand_in(name, contract):
    """A kernel with `contract` that records what it receives and computes in float64; clobbers k if the
    contract says the real kernel does (like sageattention 1.0.6's `k -= km`)."""
    calls = []
    seq = 2 if contract.layout == "HND" else 1

    def run(q, k, v, *, scale, mask):
        for t in (q, k, v):
            assert complaints(contract, t) == [], complaints(contract, t)
        assert mask is None or contract.masks
        assert k.shape[seq] % contract.kv_len_multiple == 0
        assert k.shape[seq] >= max(contract.min_kv_len, contract.faster_from_kv_len)
        assert contract.feed_head_dim(q.shape[-1]) == q.shape[-1]
        calls.append(dict(kv_len=k.shape[seq], head_dim=q.shape[-1], batch=q.shape[0], mask=mask,
                          kv_heads=k.shape[3 - seq], ptrs=(q.data_ptr(), k.data_ptr(), v.data_ptr())))
        if contract.clobbers_k:
            k -= k.mean(dim=seq, keepdim=True)   # softmax is shift-invariant: the result stays right
        hnd = [t if seq == 2 else t.transpose(1, 2) for t in (q, k, v)]
        out = dense_f64(*hnd, scale, mask).to(q.dtype)
        return out if seq == 2 else out.transpose(1, 2)

    registry_name = ROLES.get(name, (name,))[0]
    return Kernel(registry_name, on_cpu(contract), run), calls


# ---------------------------------------------------------------------------------------------------------------
# Adversarial input layouts, each with whether it meets a last-dim / fully contiguous 16-byte-aligned contract
# ---------------------------------------------------------------------------------------------------------------

def _contiguous(b, l, h, d, dtype, g):
    return torch.randn(b, l, h, d, generator=g).to(dtype)


def _hnd_storage(b, l, h, d, dtype, g):
    return torch.randn(b, h, l, d, generator=g).to(dtype).transpose(1, 2)


def _last_dim_strided(b, l, h, d, dtype, g):
    return torch.randn(b, l, d, h, generator=g).to(dtype).transpose(-1, -2)


def _misaligned_base(b, l, h, d, dtype, g):
    return torch.randn(b * l * h * d + 1, generator=g).to(dtype)[1:].view(b, l, h, d)


def _tail_slice(b, l, h, d, dtype, g):
    """`x[:, -n:, :]` of a buffer whose rows are 3 elements wider: offset and row stride break alignment."""
    return torch.randn(b, l + 5, h * d + 3, generator=g).to(dtype)[:, -l:, 3:].unflatten(-1, (h, d))


def _fused(b, l, h, d, dtype, g, parts=3, index=1):
    """One of q/k/v taken from a fused projection: qkv.unflatten(-1, (3, H, D)).unbind(2)."""
    return torch.randn(b, l, parts * h * d, generator=g).to(dtype).unflatten(-1, (parts, h, d)).unbind(2)[index]


LAYOUTS = {
    # name: (builder, meets "last" contiguity, meets "full" contiguity given (l, h))
    "contiguous": (_contiguous, lambda layout: True, lambda layout, l, h: layout == "NHD" or l == 1 or h == 1),
    "hnd_storage": (_hnd_storage, lambda layout: True, lambda layout, l, h: layout == "HND" or l == 1 or h == 1),
    "last_dim_strided": (_last_dim_strided, lambda layout: False, lambda layout, l, h: False),
    "misaligned_base": (_misaligned_base, lambda layout: False, lambda layout, l, h: False),
    "tail_slice": (_tail_slice, lambda layout: False, lambda layout, l, h: False),
    "fused_qkv": (_fused, lambda layout: True, lambda layout, l, h: False),
}
KEY_LENGTHS = (1, 32, 65, 257, 512, 1560)
DTYPE_HEAD_DIMS = list(itertools.product((torch.float16, torch.bfloat16, torch.float32), (64, 96, 128)))


def meets(layout_name, contract, l, h):
    _, last, full = LAYOUTS[layout_name]
    if contract.contiguity == "none":
        return True
    return full(contract.layout, l, h) if contract.contiguity == "full" else last(contract.layout)


def expect_served(contract, dtype, d, lk, hq=2, hk=2, scale_default=True, masked=False):
    """Whether the stand-in must serve the call, from the contract fields (spelled out, not via rejection())."""
    if contract.head_dims is not None:
        head_ok = any((d <= x) if contract.pads_head_dim else (d == x) for x in contract.head_dims)
    else:
        head_ok = (contract.max_head_dim is None or d <= contract.max_head_dim) and d % contract.head_dim_multiple == 0
    return (dtype in contract.dtypes and head_ok and lk % contract.kv_len_multiple == 0
            and lk >= max(contract.min_kv_len, contract.faster_from_kv_len)
            and (hq == hk or contract.gqa) and (scale_default or contract.custom_scale)
            and (not masked or contract.masks))


def snapshot(*tensors):
    return [(t.clone(), t.data_ptr(), t._version) for t in tensors]


def assert_untouched(snap, tensors):
    for (copy, ptr, version), t in zip(snap, tensors):
        assert t.data_ptr() == ptr and t._version == version and torch.equal(t, copy)


# ---------------------------------------------------------------------------------------------------------------
# The main matrix: kernel x layout x key length (dtype, head dim and batch cycle through their values)
# ---------------------------------------------------------------------------------------------------------------

# Every kernel meets every layout at two key lengths, and every key length at two layouts.
CASES = [(kname, lname, KEY_LENGTHS[(i + j * 3 + n) % 6], *DTYPE_HEAD_DIMS[(i + 4 * j + 5 * n) % 9], 1 + (i + n) % 2)
         for n, kname in enumerate(ROLES) for i, lname in enumerate(LAYOUTS) for j in range(2)]


@pytest.mark.parametrize("kname,lname,lk,dtype,d,b", CASES)
def test_kernel_sees_only_what_its_contract_allows(kname, lname, lk, dtype, d, b, rng):
    contract = CONTRACTS[kname]
    builder = LAYOUTS[lname][0]
    h, lq = 2, 9
    q = builder(b, lq, h, d, dtype, rng)
    k, v = builder(b, lk, h, d, dtype, rng), builder(b, lk, h, d, dtype, rng)
    snap = snapshot(q, k, v)
    fake, calls = stand_in(kname, contract)
    with stand_in_kernels(fake), count_copies() as copies:
        out = attention(q, k, v, policy=ROLES[kname][1])
    served = expect_served(contract, dtype, d, lk)
    assert bool(calls) == served
    if served:
        needed = [not meets(lname, contract, n, h) for n in (lq, lk, lk)]
        needed[1] = needed[1] or contract.clobbers_k
        assert copies.count == sum(needed)
    else:
        assert copies.count == 0
    assert out.shape == q.shape and out.dtype == dtype
    assert rel_err(out, reference(q, k, v)) < TOL[dtype]
    assert_untouched(snap, (q, k, v))


@pytest.mark.parametrize("lname", list(LAYOUTS))
def test_sageattention_legacy_never_touches_caller_k(lname, rng):
    """1.0.6 subtracts the key mean in place: the kernel gets a private k, q and v pass as views when they can."""
    contract = CONTRACTS["sageattn_legacy"]
    builder = LAYOUTS[lname][0]
    q, k, v = builder(2, 40, 2, 64, torch.float16, rng), builder(2, 128, 2, 64, torch.float16, rng), \
        builder(2, 128, 2, 64, torch.float16, rng)
    snap = snapshot(q, k, v)
    fake, calls = stand_in("sageattn_legacy", contract)
    with stand_in_kernels(fake), count_copies() as copies:
        out = attention(q, k, v, policy="sageattn")
    assert len(calls) == 1 and calls[0]["ptrs"][1] != k.data_ptr()
    compliant = meets(lname, contract, 40, 2)
    assert copies.count == 1 + 2 * (not compliant)
    if compliant:
        assert calls[0]["ptrs"][0] == q.data_ptr() and calls[0]["ptrs"][2] == v.data_ptr()
    assert rel_err(out, reference(q, k, v)) < TOL[torch.float16]
    assert_untouched(snap, (q, k, v))


def test_fused_qkv_views_pass_without_copies(rng):
    qkv = torch.randn(2, 96, 3 * 4 * 64, generator=rng).to(torch.bfloat16)
    q, k, v = qkv.unflatten(-1, (3, 4, 64)).unbind(2)
    for kname in ("sdpa_cudnn", "flash_attn", "sageattn"):
        fake, calls = stand_in(kname, CONTRACTS[kname])
        with stand_in_kernels(fake), count_copies() as copies:
            out = attention(q, k, v, policy=ROLES[kname][1])
        assert len(calls) == 1 and copies.count == 0, kname
        assert rel_err(out, reference(q, k, v)) < TOL[torch.bfloat16]


def test_head_dim_padding_is_exact_and_one_copy_each(rng):
    """sageattention 1.0.6 runs D in {64, 96, 128}: D=32 and D=80 are zero-padded (scale kept at D^-0.5)."""
    for d, fed in ((32, 64), (80, 96)):
        q, k, v = (torch.randn(1, n, 2, d, generator=rng).half() for n in (30, 64, 64))
        fake, calls = stand_in("sageattn_legacy", CONTRACTS["sageattn_legacy"])
        with stand_in_kernels(fake), count_copies() as copies:
            out = attention(q, k, v, policy="sageattn")
        assert calls[0]["head_dim"] == fed and copies.count == 3 and out.shape == q.shape
        assert rel_err(out, reference(q, k, v)) < TOL[torch.float16]


# ---------------------------------------------------------------------------------------------------------------
# Key lengths and masks on every path
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kname", ["sdpa_cudnn", "flash_attn", "sageattn_legacy", "sdpa_efficient"])
def test_k_lens_sliced_into_runs_for_unmasked_kernels(kname, rng):
    contract = CONTRACTS[kname]
    lens = [128, 64, 64, 128]
    q = torch.randn(4, 33, 2, 64, generator=rng).half()
    k, v = (torch.randn(4, 128, 2, 64, generator=rng).half() for _ in range(2))
    fake, calls = stand_in(kname, contract)
    with stand_in_kernels(fake), count_copies() as copies:
        out = attention(q, k, v, policy=ROLES[kname][1], k_lens=torch.tensor(lens))
    assert [(c["batch"], c["kv_len"]) for c in calls] == [(1, 128), (2, 64), (1, 128)]
    assert all(c["mask"] is None for c in calls)
    assert copies.count == (3 if contract.clobbers_k else 0)
    assert rel_err(out, reference(q, k, v, k_lens=lens)) < TOL[torch.float16]


def test_k_lens_with_a_buggy_length_is_routed_elsewhere(rng):
    q = torch.randn(2, 33, 2, 64, generator=rng).half()
    k, v = (torch.randn(2, 128, 2, 64, generator=rng).half() for _ in range(2))
    fake, calls = stand_in("sageattn_legacy", CONTRACTS["sageattn_legacy"])
    with stand_in_kernels(fake):
        out = attention(q, k, v, policy="sageattn", k_lens=[128, 65])
    assert calls == []
    assert rel_err(out, reference(q, k, v, k_lens=[128, 65])) < TOL[torch.float16]


def test_key_length_one_is_routed_away_from_cudnn(rng):
    """cuDNN SDPA refuses Lk = 1 at run time: whole calls and k_lens runs of length 1 go to the next kernel."""
    q = torch.randn(2, 33, 2, 64, generator=rng).half()
    k, v = (torch.randn(2, 8, 2, 64, generator=rng).half() for _ in range(2))
    fake, calls = stand_in("sdpa_cudnn", CONTRACTS["sdpa_cudnn"])
    with stand_in_kernels(fake):
        whole = attention(q, k[:, :1], v[:, :1], policy="sdpa_cudnn")
        runs = attention(q, k, v, policy="sdpa_cudnn", k_lens=[8, 1])
        assert calls == [] and select_kernel(q, k[:, :1], v[:, :1], policy="sdpa_cudnn") == "sdpa_native"
        attention(q, k[:, :2], v[:, :2], policy="sdpa_cudnn")
    assert [c["kv_len"] for c in calls] == [2]
    assert rel_err(whole, reference(q, k[:, :1], v[:, :1])) < TOL[torch.float16]
    assert rel_err(runs, reference(q, k, v, k_lens=[8, 1])) < TOL[torch.float16]


def test_approximate_kernel_is_passed_over_where_an_exact_one_is_faster(rng, caplog):
    """int8_triton pinned: short key lengths (cross-attention) go to an exact kernel, once-logged with the reason;
    long ones run it."""
    dispatch._noted.clear()
    contract = CONTRACTS["int8_triton"]
    q = torch.randn(1, 16, 2, 64, generator=rng).half()
    long_kv = [torch.randn(1, contract.faster_from_kv_len, 2, 64, generator=rng).half() for _ in range(2)]
    fake, calls = stand_in("int8_triton", contract)
    with stand_in_kernels(fake), caplog.at_level(logging.INFO, logger="wantalk"):
        short = attention(q, long_kv[0][:, :512], long_kv[1][:, :512], policy="int8_triton")
        assert calls == [] and select_kernel(q, long_kv[0][:, :512], long_kv[1][:, :512], policy="int8_triton") \
            != "int8_triton"
        attention(q, *long_kv, policy="int8_triton")
    assert [c["kv_len"] for c in calls] == [contract.faster_from_kv_len]
    assert rel_err(short, reference(q, long_kv[0][:, :512], long_kv[1][:, :512])) < TOL[torch.float16]
    assert any("an exact kernel is faster" in r.getMessage() for r in caplog.records)


def test_many_distinct_key_lengths_become_a_mask(rng):
    b = dispatch.MAX_KEY_LENGTH_RUNS + 2
    lens = list(range(20, 20 + b))
    q = torch.randn(b, 7, 2, 64, generator=rng).half()
    k, v = (torch.randn(b, 40, 2, 64, generator=rng).half() for _ in range(2))
    cudnn, cudnn_calls = stand_in("sdpa_cudnn", CONTRACTS["sdpa_cudnn"])
    efficient, efficient_calls = stand_in("sdpa_efficient", CONTRACTS["sdpa_efficient"])
    with stand_in_kernels(cudnn, efficient):
        out = attention(q, k, v, policy="sdpa_cudnn", k_lens=torch.tensor(lens))
        out_eff = attention(q, k, v, policy="sdpa_efficient", k_lens=torch.tensor(lens))
    assert cudnn_calls == [] and len(efficient_calls) == 1 and efficient_calls[0]["mask"].dtype == torch.bool
    for o in (out, out_eff):
        assert rel_err(o, reference(q, k, v, k_lens=lens)) < TOL[torch.float16]


@pytest.mark.parametrize("mask_kind", ["bool", "additive", "additive_fp32", "bool_2d"])
@pytest.mark.parametrize("with_k_lens", [False, True])
def test_masks_reach_only_mask_capable_kernels(mask_kind, with_k_lens, rng):
    b, lq, lk, h = 2, 17, 65, 2
    q = torch.randn(b, lq, h, 64, generator=rng).bfloat16()
    k, v = (torch.randn(b, lk, h, 64, generator=rng).bfloat16() for _ in range(2))
    keep = torch.rand(b, 1, lq, lk, generator=rng) > 0.3
    keep[..., 0] = True   # no fully masked rows
    mask = {"bool": keep, "bool_2d": keep[0, 0],
            "additive": torch.where(keep, 0.0, float("-inf")).bfloat16() + 0.5 * keep.float().bfloat16(),
            "additive_fp32": torch.where(keep, torch.randn(keep.shape, generator=rng), float("-inf"))}[mask_kind]
    lens = [lk, 40] if with_k_lens else None
    snap = snapshot(q, k, v, mask)
    ref = reference(q, k, v, attn_mask=mask, k_lens=lens)
    for kname in ("sdpa_cudnn", "flash_attn", "sageattn", "sdpa_efficient"):
        fake, calls = stand_in(kname, CONTRACTS[kname])
        with stand_in_kernels(fake):
            out = attention(q, k, v, policy=ROLES[kname][1], attn_mask=mask, k_lens=lens)
        assert bool(calls) == CONTRACTS[kname].masks, kname
        if calls:
            assert calls[0]["mask"].dtype in (torch.bool, torch.bfloat16)   # never a mask of another float dtype
        assert rel_err(out, ref) < TOL[torch.bfloat16], kname
    assert_untouched(snap, (q, k, v, mask))


def test_gqa_goes_only_to_kernels_that_support_it(rng):
    q = torch.randn(2, 21, 4, 64, generator=rng).half()
    k, v = (torch.randn(2, 64, 2, 64, generator=rng).half() for _ in range(2))
    for kname, served in (("sdpa_cudnn", False), ("flash_attn", True), ("sageattn", True)):
        fake, calls = stand_in(kname, CONTRACTS[kname])
        with stand_in_kernels(fake):
            out = attention(q, k, v, policy=ROLES[kname][1])
        assert bool(calls) == served and all(c["kv_heads"] == 2 for c in calls)
        assert rel_err(out, reference(q, k, v)) < TOL[torch.float16]


def test_custom_scale_skips_fixed_scale_kernels(rng):
    q, k, v = (torch.randn(1, n, 2, 64, generator=rng).half() for n in (40, 128, 128))
    fake, calls = stand_in("sageattn_3", CONTRACTS["sageattn_3"])
    with stand_in_kernels(fake):
        out = attention(q, k, v, policy="sageattn_3", scale=0.3)
        assert calls == []
        assert rel_err(out, reference(q, k, v, scale=0.3)) < TOL[torch.float16]
        attention(q, k, v, policy="sageattn_3")
        assert len(calls) == 1


def test_non_float_q_and_mixed_dtypes_are_converted_once(rng):
    q = torch.randn(1, 10, 2, 64, generator=rng).half()
    k, v = (torch.randn(1, 64, 2, 64, generator=rng).float() for _ in range(2))
    fake, calls = stand_in("sdpa_flash", CONTRACTS["sdpa_flash"])
    with stand_in_kernels(fake), count_copies() as copies:
        out = attention(q, k, v, policy="sdpa_flash")
    assert len(calls) == 1 and copies.count == 2 and out.dtype == torch.float16
    assert rel_err(out, reference(q, k, v)) < TOL[torch.float16]


# ---------------------------------------------------------------------------------------------------------------
# Fallback behaviour, logging, chains, versions, errors
# ---------------------------------------------------------------------------------------------------------------

def test_fallback_logs_once_per_mode_and_reason(rng, caplog):
    dispatch._noted.clear()
    q, k, v = (torch.randn(1, n, 2, 64, generator=rng).half() for n in (9, 65, 65))
    fake, _ = stand_in("sageattn_legacy", CONTRACTS["sageattn_legacy"])
    with stand_in_kernels(fake), caplog.at_level(logging.INFO, logger="wantalk"):
        for _ in range(3):
            attention(q, k, v, policy="sageattn")
    lines = [r.getMessage() for r in caplog.records if "key length % 64" in r.getMessage()]
    assert len(lines) == 1 and "sageattn" in lines[0]


def test_kernel_declining_at_run_time_falls_back_once(rng, caplog):
    """AttentionUnsupported from an adapter: logged once, the next kernel serves, and the declined kernel is not
    asked again for that call signature."""
    dispatch._noted.clear()
    q, k, v = (torch.randn(1, n, 2, 64, generator=rng).half() for n in (9, 64, 64))
    tries = []

    def declines(q, k, v, *, scale, mask):
        tries.append(1)
        raise kernels.AttentionUnsupported("stand-in declines")
    fake = Kernel("sdpa_flash", on_cpu(CONTRACTS["sdpa_flash"]), declines)
    with stand_in_kernels(fake), caplog.at_level(logging.WARNING, logger="wantalk"):
        outs = [attention(q, k, v, policy="sdpa_flash") for _ in range(3)]
    assert len(tries) == 1
    assert all(rel_err(out, reference(q, k, v)) < TOL[torch.float16] for out in outs)
    assert sum("stand-in declines" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("error", [RuntimeError("adapter bug"), ValueError("adapter bug"),
                                   NotImplementedError("adapter bug"), TypeError("adapter bug")])
def test_other_kernel_errors_surface(error, rng):
    """Only AttentionUnsupported means "use the next kernel": any other exception is a bug and reaches the
    caller (it used to be swallowed into a once-logged warning)."""
    q, k, v = (torch.randn(1, n, 2, 64, generator=rng).half() for n in (9, 64, 64))

    def broken(q, k, v, *, scale, mask):
        raise error
    with stand_in_kernels(Kernel("sdpa_flash", on_cpu(CONTRACTS["sdpa_flash"]), broken)):
        with pytest.raises(type(error), match="adapter bug"):
            attention(q, k, v, policy="sdpa_flash")


def test_sdpa_refusal_phrases_become_unsupported():
    """A pinned SDPA backend answering "No available kernel" is a refusal; other RuntimeErrors are not."""
    assert isinstance(kernels._refusal(RuntimeError("No available kernel. Aborting execution.")),
                      kernels.AttentionUnsupported)
    assert kernels._refusal(RuntimeError("CUDA error: an illegal memory access was encountered")) is None
    with pytest.raises(kernels.AttentionUnsupported, match="No available kernel"):
        with kernels._sdpa_refusals_decline():
            raise RuntimeError("No available kernel. Aborting execution.")
    with pytest.raises(RuntimeError, match="illegal memory access"):
        with kernels._sdpa_refusals_decline():
            raise RuntimeError("CUDA error: an illegal memory access was encountered")


def test_mode_names_and_chains():
    assert ATTENTION_MODES[:7] == ("auto", "sdpa", "flash_attn", "sageattn", "sageattn_3", "sageattn_3_fp4",
                                   "sageattn_3_fp8")
    for mode in ATTENTION_MODES:
        for cap in ((8, 0), (8, 9), (9, 0), (12, 0)):
            chain = kernel_chain(mode, "cuda", cap)
            assert "sdpa_math" in (chain[0], chain[-1]) and len(set(chain)) == len(chain)
            assert all(CONTRACTS[n].exact for n in chain if n not in (mode, "sageattn")), (mode, chain)
            if mode.startswith("sdpa"):
                assert all(n.startswith("sdpa") for n in chain)
        assert {"sdpa_native", "sdpa_math"} <= set(kernel_chain(mode, "cpu", None))
    assert kernel_chain("auto", "cuda", (9, 0))[:2] == ("flash_attn_4", "sdpa_cudnn")
    assert kernel_chain("sdpa", "cuda", (9, 0))[0] == "sdpa_cudnn"
    assert kernel_chain("auto", "cuda", (8, 6))[0] == "flash_attn"
    assert kernel_chain("sageattn_3_fp4", "cuda", (9, 0))[:2] == ("sageattn_3_fp4", "sageattn")


def test_sageattention_version_picks_the_contract(monkeypatch):
    assert kernels.installed_version("surely-not-an-installed-distribution") is None
    assert kernels.installed_version("torch")[0] >= 2
    assert kernels.sageattention_is_buggy((1, 0, 6)) and kernels.sageattention_is_buggy((1, 0, 5))
    assert not kernels.sageattention_is_buggy((2, 2, 0)) and not kernels.sageattention_is_buggy((1, 0, 7))
    for version, expected in (((1, 0, 6), "sageattn_legacy"), ((2, 2, 0), "sageattn")):
        monkeypatch.setattr(kernels, "installed_version", lambda dist, v=version: v)
        assert kernels._sage_kernel().contract == CONTRACTS[expected]


def test_contract_rules_from_the_kernel_facts():
    assert CONTRACTS["sageattn_legacy"].kv_len_multiple == 64 and CONTRACTS["sageattn_legacy"].clobbers_k
    assert CONTRACTS["sageattn_3"].capabilities == ((12, 0), (12, 1)) and not CONTRACTS["sageattn_3"].custom_scale
    assert not CONTRACTS["sdpa_cudnn"].masks and not CONTRACTS["sdpa_cudnn"].gqa
    assert CONTRACTS["sdpa_cudnn"].min_kv_len == 2 and CONTRACTS["sdpa_cudnn"].align_bytes == 16
    assert all(not c.exact for n, c in CONTRACTS.items() if n.startswith("sageattn"))


def test_select_kernel_reports_the_route(rng):
    q, k, v = (torch.randn(1, n, 2, 64, generator=rng).half() for n in (9, 64, 64))
    assert select_kernel(q, k, v) == "sdpa_native"
    fake, _ = stand_in("sdpa_cudnn", CONTRACTS["sdpa_cudnn"])
    with stand_in_kernels(fake):
        assert select_kernel(q, k, v, policy="sdpa_cudnn") == "sdpa_cudnn"
        assert select_kernel(q, k, v, policy="sdpa_cudnn", attn_mask=torch.ones(9, 64, dtype=torch.bool)) \
            == "sdpa_native"


def test_bad_input_gets_clear_errors(rng):
    q, k, v = (torch.randn(1, n, 2, 64, generator=rng) for n in (9, 16, 16))
    with pytest.raises(ValueError, match="unknown attention mode"):
        attention(q, k, v, policy="xformers")
    with pytest.raises(ValueError, match="k_lens"):
        attention(q, k, v, k_lens=[0])
    with pytest.raises(ValueError, match="attn_mask"):
        attention(q, k, v, attn_mask=torch.ones(9, 15, dtype=torch.bool))
    with pytest.raises(ValueError, match="B, L, H, D"):
        attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="query heads"):
        attention(torch.randn(1, 9, 3, 64), k, v)


def test_cached_routes_never_go_stale(rng, caplog):
    """Repeated signatures reuse their route; a different alignment class, dtype or mode re-decides, and copies
    made on cached calls are still counted."""
    assert all(dispatch.ALIGNMENT_CLASS % c.align_bytes == 0 for c in CONTRACTS.values())   # real kernels cache
    q, k, v = (torch.randn(2, n, 2, 64, generator=rng).half() for n in (9, 32, 32))
    misaligned_q = _misaligned_base(2, 9, 2, 64, torch.float16, rng)   # q's shape and strides, odd pointer
    fake, calls = stand_in("sdpa_cudnn", CONTRACTS["sdpa_cudnn"])   # the stand-in asserts 16-byte alignment
    with stand_in_kernels(fake):
        for inputs, copies_per_call in (((q, k, v), 0), ((misaligned_q, k, v), 1), ((q, k, v), 0)):
            with count_copies() as copies:
                for _ in range(3):
                    out = attention(*inputs, policy="sdpa_cudnn")
            assert copies.count == 3 * copies_per_call
            assert rel_err(out, reference(*inputs)) < TOL[torch.float16]
        assert len(calls) == 9
        assert select_kernel(q.float(), k.float(), v.float(), policy="sdpa_cudnn") == "sdpa_native"   # dtype
        assert select_kernel(q, k, v, policy="sdpa_math") == "sdpa_math"                              # mode
        assert select_kernel(q, k, v, policy="sdpa_cudnn") == "sdpa_cudnn"
        attention(q, k[:, :1], v[:, :1], policy="sdpa_cudnn")   # cuDNN passed over (key length 1): route cached
        dispatch._noted.clear()
        with caplog.at_level(logging.INFO, logger="wantalk"):
            attention(q, k[:, :1], v[:, :1], policy="sdpa_cudnn")   # the cached route still logs what is new
    assert select_kernel(q, k, v, policy="sdpa_cudnn") != "sdpa_cudnn"   # stand-in gone: the table changed
    assert any("key length < 2" in r.getMessage() for r in caplog.records)
