"""Loading a full-size Wan 2.1 I2V 14B checkpoint with quantization: wall time, peak host RSS, peak GPU memory.

The first run writes a random-weight bf16 checkpoint with the real key names and shapes to local disk, streamed
tensor by tensor (never whole in RAM); later runs reuse it. Each load runs in a fresh subprocess so its peaks are
its own. Host memory is sampled from /proc/self/status every 20 ms: RssAnon (process memory) and VmRSS (which
also counts the file's memory-mapped pages, reclaimable page cache).

    python bench/load_14b.py                                  # writes the file once, loads with fp8_e4m3fn_scaled and fp4
    python bench/load_14b.py --modes fp4_scaled_fast --path /data/wan14b.safetensors
"""
import argparse
import json
import os
import struct
import subprocess
import sys
import threading
import time

import torch

from _common import import_pack, write_result

DTYPE_NAMES = {torch.bfloat16: "BF16", torch.float32: "F32"}


def model_shapes() -> dict[str, tuple[int, ...]]:
    """Key -> shape of the official I2V 14B layout, from our model built on the meta device."""
    import_pack()
    from wantalk.wanvideo.modules.model import WAN_I2V_14B, WanModel
    with torch.device("meta"):
        model = WanModel(WAN_I2V_14B, device="meta", dtype=torch.bfloat16)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def write_random_checkpoint(path: str, shapes: dict, dtype=torch.bfloat16, device="cuda") -> None:
    """A safetensors file written one tensor at a time (random values of a realistic scale, made on the GPU)."""
    header, offset = {}, 0
    for key, shape in shapes.items():
        size = dtype.itemsize * int(torch.tensor(shape).prod()) if shape else dtype.itemsize
        header[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    gen = torch.Generator(device=device).manual_seed(0)
    tmp = path + ".partial"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for key, shape in shapes.items():
            t = torch.randn(shape, device=device, generator=gen)
            if len(shape) >= 2:
                t = t / (int(torch.tensor(shape[1:]).prod()) ** 0.5)
            elif "norm" in key and key.endswith("weight"):
                t = 1 + 0.1 * t
            else:
                t = 0.1 * t
            f.write(t.to(dtype).cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    os.replace(tmp, path)


class HostMemory:
    """Peak RssAnon / VmRSS of this process, sampled in a thread."""

    def __init__(self):
        self.peak = {"RssAnon": 0, "VmRSS": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self):
        with open("/proc/self/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name in self.peak:
                    self.peak[name] = max(self.peak[name], int(value.split()[0]) * 1024)

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            time.sleep(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()


def load_once(path: str, mode: str) -> None:
    import_pack()
    from wantalk.wanvideo.loader import load_wan_model
    torch.cuda.init()
    with HostMemory() as host:
        t0 = time.perf_counter()
        model = load_wan_model(path, device="cuda", base_dtype=torch.bfloat16, quantization=mode)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    report = model.quant_report
    write_result("load_14b", {
        "bench": "load_14b", "mode": mode, "wall_s": wall, "file_gib": os.path.getsize(path) / 2**30,
        "peak_host_anon_gib": host.peak["RssAnon"] / 2**30, "peak_host_rss_gib": host.peak["VmRSS"] / 2**30,
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30,
        "final_gpu_gib": torch.cuda.memory_allocated() / 2**30, "summary": report.summary(),
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")})


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--path", default=os.path.join(os.environ.get("WANTALK_BENCH_DIR", "/tmp"),
                                                  "wan21_i2v_14b_random_bf16.safetensors"))
    p.add_argument("--modes", default="fp8_e4m3fn_scaled,fp4")
    p.add_argument("--load", default=None, help=argparse.SUPPRESS)  # internal: one load in this process
    args = p.parse_args()
    if args.load:
        return load_once(args.path, args.load)
    shapes = model_shapes()
    expected = sum(2 * int(torch.tensor(s).prod()) if s else 2 for s in shapes.values())
    if not os.path.isfile(args.path) or os.path.getsize(args.path) < expected:
        t0 = time.perf_counter()
        write_random_checkpoint(args.path, shapes)
        print(f"wrote {args.path} ({os.path.getsize(args.path) / 2**30:.1f} GiB) in {time.perf_counter() - t0:.0f}s")
    for mode in args.modes.split(","):
        subprocess.run([sys.executable, os.path.abspath(__file__), "--path", args.path, "--load", mode], check=True)


if __name__ == "__main__":
    main()
