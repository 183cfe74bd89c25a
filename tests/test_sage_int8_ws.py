"""The warp-specialized sm90 schedule of the 8-bit attention without a GPU: it imports anywhere, says why it cannot
run, and compiles for sm90 with the installed Triton (Gluon -> PTX -> cubin by the wheel's own ptxas) into INT8 and
FP8 warpgroup MMAs, TMA loads and the 240 / 240 / 24 register split, within the shared memory of an SM.

Its arithmetic is checked on a Hopper GPU by tests/test_sage_int8_ws_gpu.py.
"""
import re

import pytest
import torch

from wantalk.wanvideo.kernels import sage_int8_ws


def test_unavailable_names_the_reason_without_a_hopper_gpu():
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9 and sage_int8_ws.gluon is not None:
        assert sage_int8_ws.unavailable() is None
    else:
        reason = sage_int8_ws.unavailable()
        assert isinstance(reason, str) and reason


def test_compiles_for_sm90_offline():
    if sage_int8_ws.gluon is None:
        pytest.skip("Triton with Gluon is not installed")
    import triton
    if not triton.__version__.startswith(sage_int8_ws.VALIDATED_TRITON):
        pytest.skip(f"the kernel is built for Triton {sage_int8_ws.VALIDATED_TRITON}x only, this is {triton.__version__}")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import create_function_from_signature

    kernel = sage_int8_ws._attention_ws_kernel
    n, d = 1024, 128
    q8 = torch.zeros(n, d, dtype=torch.int8)
    vt = torch.zeros(d, n, dtype=torch.float8_e4m3fn)
    descriptors = [sage_int8_ws._descriptor(q8, [sage_int8_ws.ROWS, d], gl.int8),
                   sage_int8_ws._descriptor(q8, [sage_int8_ws.BLOCK_N, d], gl.int8),
                   sage_int8_ws._descriptor(vt, [d, sage_int8_ws.BLOCK_N], gl.float8e4nv)]
    scales, out = torch.zeros(64), torch.zeros(1, 4, 1, d, dtype=torch.bfloat16)
    args = [*descriptors, scales, scales, scales, scales, out, 1000, 1000, 40, n, n, 1, 5, 6, 7]
    options = dict(STAGES=sage_int8_ws.STAGES, num_warps=4, maxnreg=168)
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    bound, specialization, parsed = create_function_from_signature(kernel.signature, kernel.params, backend)(
        *args, **options)
    parsed, signature, constexprs, attrs = kernel._pack_args(backend, options, bound, specialization, parsed)
    compiled = triton.compile(GluonASTSource(kernel, signature, constexprs, attrs), target=target,
                              options=parsed.__dict__)
    ptx = compiled.asm["ptx"]
    assert "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8" in ptx                # INT8 Q.K
    assert re.search(r"wgmma\.mma_async\.sync\.aligned\.m64n128k32\.f32\.e4m3\.e4m3", ptx)   # FP8 P.V
    assert "setmaxnreg.inc.sync.aligned.u32 \t240" in ptx and "setmaxnreg.dec.sync.aligned.u32 \t24" in ptx
    assert "cp.async.bulk.tensor.2d" in ptx                                          # TMA loads
    assert compiled.metadata.shared <= 227 * 1024
