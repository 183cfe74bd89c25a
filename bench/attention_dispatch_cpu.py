"""CPU cost of one `attention()` dispatch (issue 3 follow-up): a stand-in kernel with cuDNN's real contract that
returns at once, so the time is the dispatcher's own. Runs anywhere: `python bench/attention_dispatch_cpu.py`."""
import time

import torch

from _common import import_pack

import_pack()
from wantalk.wanvideo.modules.attention import attention  # noqa: E402
from wantalk.wanvideo.modules.attention_kernels import CONTRACTS, Kernel, on_cpu, stand_in_kernels  # noqa: E402


def instant(q, k, v, *, scale, mask):
    return q   # q is already [B, H, Lq, D] here: the output's layout and shape


def per_call_us(q, k, v, calls: int, **kwargs) -> float:
    for _ in range(50):
        attention(q, k, v, policy="sdpa_cudnn", **kwargs)
    start = time.perf_counter()
    for _ in range(calls):
        attention(q, k, v, policy="sdpa_cudnn", **kwargs)
    return (time.perf_counter() - start) / calls * 1e6


def main(calls: int = 2000, repeats: int = 5):
    fused = torch.randn(2, 77, 3 * 8 * 64).bfloat16().unflatten(-1, (3, 8, 64)).unbind(2)
    cases = {
        "fused qkv views, no k_lens": (fused, {}),
        "misaligned q (one copy)": ((torch.randn(2 * 77 * 8 * 64 + 1).bfloat16()[1:].view(2, 77, 8, 64),
                                     *fused[1:]), {}),
        "k_lens [77, 40] (two launches)": (fused, {"k_lens": torch.tensor([77, 40])}),
    }
    with stand_in_kernels(Kernel("sdpa_cudnn", on_cpu(CONTRACTS["sdpa_cudnn"]), instant)):
        for name, (qkv, kwargs) in cases.items():
            best = min(per_call_us(*qkv, calls, **kwargs) for _ in range(repeats))
            print(f"{name:32s} {best:7.1f} us/call (best of {repeats} x {calls} calls)")


if __name__ == "__main__":
    main()
