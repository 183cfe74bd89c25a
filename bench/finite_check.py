"""Cost of the NaN/inf check the loader runs on every weight as it streams in (wanvideo.checkpoint.checked_tensor),
estimated for a full-size Wan 2.1 I2V 14B + InfiniteTalk from the official key listings: one block's tensors (and
the top-level ones) are checked with random values at the real shapes in the given storage dtype on the given
device; the per-block time is scaled to every block. Reported next to the time to read the same bytes at
`--disk-gbps`, since a load streams every byte from disk anyway.

    python bench/finite_check.py --device cpu --dtype bf16
    python bench/finite_check.py --device cuda --dtype fp8
"""
import argparse
import math
import re
import time

import torch

from _common import import_pack, reference_shapes, write_result

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp8": torch.float8_e4m3fn}


def timed(fn, device, repeats: int = 3) -> float:
    """Best of `repeats` wall-clock seconds (synchronised on CUDA)."""
    best = math.inf
    for _ in range(repeats + 1):  # the first call warms up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--listings", default="keys_i2v14b.txt,keys_infinitetalk.txt")
    parser.add_argument("--disk-gbps", type=float, default=3.0, help="read speed the check is compared with")
    args = parser.parse_args()
    checkpoint = import_pack().wanvideo.checkpoint
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    shapes = {}
    for listing in args.listings.split(","):
        shapes.update(reference_shapes(listing))
    blocks = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k)))
    sample = {k: s for k, s in shapes.items() if k.startswith("blocks.0.") or not k.startswith("blocks.")}
    gen = torch.Generator(device=device).manual_seed(0)
    tensors = [(k, torch.randn(s, generator=gen, device=device).to(dtype)) for k, s in sample.items()]

    def check_all():
        for key, tensor in tensors:
            checkpoint.checked_tensor(tensor, key, "bench")

    seconds_sample = timed(check_all, device)
    block_elements = sum(t.numel() for k, t in tensors if k.startswith("blocks.0."))
    top_elements = sum(t.numel() for k, t in tensors if not k.startswith("blocks."))
    seconds_block = timed(lambda: [checkpoint.checked_tensor(t, k, "bench") for k, t in tensors
                                   if k.startswith("blocks.0.")], device)
    total_elements = top_elements + blocks * block_elements
    seconds_total = seconds_sample + (blocks - 1) * seconds_block
    total_bytes = total_elements * tensors[0][1].element_size()
    result = {"bench": "finite_check", "device": torch.cuda.get_device_name(device) if device.type == "cuda"
              else "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__, "dtype": args.dtype,
              "params": total_elements, "blocks": blocks, "check_s": round(seconds_total, 3),
              "check_gbps": round(total_bytes / seconds_total / 1e9, 2),
              "read_s_at_disk_gbps": round(total_bytes / (args.disk_gbps * 1e9), 1),
              "overhead_vs_read": round(seconds_total / (total_bytes / (args.disk_gbps * 1e9)), 3)}
    write_result("finite_check", result)


if __name__ == "__main__":
    main()
