"""The 8-bit attention kernel (`int8_triton`) on CPU through the Triton interpreter, against float32 attention:
every autotune config, FP8 P.V (Hopper/Ada) and FP16 P.V (Ampere), without a GPU.

    python -m pytest tests/test_sage_int8_interpreter.py -q     # needs triton importable; ~30 s on 2 cores

The kernels run in one child process with TRITON_INTERPRET=1 (the interpreter must be chosen before the kernels
are defined); the tests check what it reports. Inputs are small (H 2, up to 300 keys, key lengths not multiples
of the 128-key tile): randn plus per-channel offsets in K and V, as biased linear layers produce, and the hard
case of zero-mean V with x10 outlier channels in Q and K.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

KERNEL = Path(__file__).resolve().parent.parent / "wanvideo" / "kernels" / "sage_int8.py"
# name: (query tokens, key tokens, hard case?)
CASES = {"realistic_300": (64, 300, False), "hard_300": (64, 300, True), "realistic_1": (65, 1, False),
         "realistic_129": (65, 129, False)}
# P.V operand type: Hopper/Ada (the default), Ampere
PATHS = {"fp8": torch.float8_e4m3fn, "fp16": torch.float16}


def _kernel_module():
    spec = importlib.util.spec_from_file_location("sage_int8_interpreted", KERNEL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _patch_interpreter():
    """Three gaps of the Triton 3.6 interpreter that the GPU compiler does not have: a scalar used as a loop bound is
    a one-element array (NumPy >= 2.3 refuses int() of it), a bf16 dot multiplies the raw uint16 bits, and float32
    -> e4m3 rounding up across a power of two halves the value (127 -> 64); torch's conversion rounds right."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor

    def patched_tensor(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    def as_float32(handle):
        if handle.dtype != tl.bfloat16:
            return handle
        return interpreter.TensorHandle((handle.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def to_fp8(self, src, dst_type, rounding_mode):
        if src.dtype != tl.float32 or dst_type.scalar != tl.float8e4nv:
            return to_float(self, src, dst_type, rounding_mode)
        data = torch.from_numpy(src.data).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
        return interpreter.TensorHandle(data, tl.float8e4nv)

    dot = interpreter.InterpreterBuilder.create_dot
    to_float = interpreter.InterpreterBuilder.create_fp_to_fp
    interpreter._patch_lang_tensor = patched_tensor
    interpreter.InterpreterBuilder.create_fp_to_fp = to_fp8
    interpreter.InterpreterBuilder.create_dot = lambda self, a, b, d, *rest: dot(self, as_float32(a), as_float32(b),
                                                                                  d, *rest)


def _inputs(lq, lk, hard, heads=2, d=128):
    """q, k, v ([1, L, H, D] bf16): randn with per-channel K/V offsets, or zero-mean V with x10 Q/K outliers."""
    q, k, v = (torch.randn(1, n, heads, d) for n in (lq, lk, lk))
    if hard:
        q[..., :4] *= 10
        k[..., -4:] *= 10
    else:
        k += torch.randn(heads, d)
        v += 0.5 * torch.randn(heads, d)
    return tuple(t.bfloat16() for t in (q, k, v))


def _attention_errors(sage):
    """{"case/P.V type/config index": error against float32 attention (inf if any output is not finite)}."""
    result = {}
    for case, (lq, lk, hard) in CASES.items():
        q, k, v = _inputs(lq, lk, hard)
        ref = torch.nn.functional.scaled_dot_product_attention(
            *(t.float().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
        for path, pv in PATHS.items():
            quantized = sage.quantize_qkv(q, k, v, q.shape[-1] ** -0.5, pv)
            for index, tuned in enumerate(sage._CONFIGS):
                out = torch.empty_like(q)
                config = dict(tuned.kwargs, num_warps=tuned.num_warps, num_stages=tuned.num_stages)
                sage.attend_quantized(quantized, out, lk, q.shape[2], False, config)
                out = out.float()
                finite = bool(torch.isfinite(out).all())
                result[f"{case}/{path}/{index}"] = ((out - ref).norm() / ref.norm()).item() if finite else float("inf")
    return result


def _mma_key_order_matches(sage):
    """V quantized for the sm90 kernel holds the same codes and scales as in key order, each column moved to
    `_mma_key_position` of its key."""
    q, k, v = _inputs(64, 300, False)
    plain = sage.quantize_qkv(q, k, v, q.shape[-1] ** -0.5, torch.float8_e4m3fn)
    mma = sage.quantize_qkv(q, k, v, q.shape[-1] ** -0.5, torch.float8_e4m3fn, mma_key_order=True)
    keys = torch.arange(plain[4].shape[-1])
    position = (keys & ~14) | ((keys & 6) << 1) | ((keys >> 2) & 2)
    moved = torch.empty_like(plain[4].view(torch.uint8))
    moved[..., position] = plain[4].view(torch.uint8)
    return bool(torch.equal(moved, mma[4].view(torch.uint8)) and torch.equal(plain[5], mma[5])
                and not torch.equal(plain[4].view(torch.uint8), mma[4].view(torch.uint8)))


@pytest.fixture(scope="module")
def interpreted():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    run = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_mma_key_order_moves_whole_columns(interpreted):
    assert interpreted["mma_key_order_matches"]


def test_every_config_matches_float32_attention(interpreted):
    """Each autotune config on both P.V types, key lengths 1, 129 and 300 (partial last tiles), realistic and hard
    inputs. Measured here: realistic 0.75% (FP8 P.V) / 0.40% (FP16), hard 4.3% / 3.2%."""
    bound = {("realistic", "fp8"): 0.03, ("realistic", "fp16"): 0.01, ("hard", "fp8"): 0.06, ("hard", "fp16"): 0.05}
    for name, err in interpreted["errors"].items():
        print(f"{name:24s} rel err {err:.4f}")
        case, path = name.split("/")[:2]
        assert err < bound[case.split("_")[0], path], name


if __name__ == "__main__":          # the child process of the `interpreted` fixture
    torch.manual_seed(0)
    _patch_interpreter()
    sage = _kernel_module()
    print(json.dumps({"errors": _attention_errors(sage), "mma_key_order_matches": _mma_key_order_matches(sage)}))
