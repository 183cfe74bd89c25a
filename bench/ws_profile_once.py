"""One launch each of the Triton and the warp-specialized 8-bit attention kernels (for a profiler's kernel filter)."""
import torch
import triton
from _common import import_pack

import_pack()
from wantalk.wanvideo.kernels import sage_int8, sage_int8_ws

q, k, v = (torch.randn(1, 16384, 40, 128, device="cuda").bfloat16() for _ in range(3))
quantized = sage_int8.quantize_qkv(q, k, v, 128 ** -0.5, torch.float8_e4m3fn)
out = torch.empty_like(q)
triton.set_allocator(sage_int8._tma_allocator)
sage_int8.attend_quantized(quantized, out, 16384, 40, True, dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3))
quantized = sage_int8.quantize_qkv(q, k, v, 128 ** -0.5, torch.float8_e4m3fn, mma_key_order=True)
sage_int8_ws.attend_quantized_ws(quantized, out, 16384, 40)
torch.cuda.synchronize()
