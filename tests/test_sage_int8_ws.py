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


def test_v_key_order_is_the_fp8_operand_order_of_the_score_registers():
    """PTX ISA fragment layouts (wgmma .m64nNk32): the accumulator gives lane t of a warp, for row t // 4, columns
    8j + 2(t % 4) + {0, 1}; an 8-bit A operand wants from it k = 4(t % 4) + {0..3} and 16 + 4(t % 4) + {0..3} of each
    32. Reading P straight from the score registers as the A operand multiplies V row k by the score of column
    c(k); V stored with key c at `_mma_key_position(c)` puts that key's row there."""
    from wantalk.wanvideo.kernels import sage_int8
    position = lambda c: (c & ~14) | ((c & 6) << 1) | ((c >> 2) & 2)   # sage_int8._mma_key_position
    for lane in range(4):
        accumulator = [8 * j + 2 * lane + i for j in range(4) for i in range(2)]        # register order
        operand = [4 * lane + i for i in range(4)] + [16 + 4 * lane + i for i in range(4)]
        for chunk in (0, 32, 96):
            assert [position(chunk + c) for c in accumulator] == [chunk + k for k in operand]
    keys = list(range(sage_int8.KBLK))
    assert sorted(position(c) for c in keys) == keys


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
                   sage_int8_ws._descriptor(vt, [d, sage_int8_ws.BLOCK_N], gl.float8e4nv),
                   sage_int8_ws._descriptor(vt[:8], [8, sage_int8_ws.BLOCK_N], gl.float8e4nv)]
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
    assert "prmt" not in ptx           # P goes from the score registers to the FP8 operand without byte moves
