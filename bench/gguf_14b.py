"""A full-size Wan 2.1 I2V 14B + InfiniteTalk GGUF file (city96 layout) through `load_wan_model`, then the 12 GB plan.

Writes a random-weight GGUF with the real key names and shapes as city96's tools lay it out (`general.architecture`
wan, reversed dims, F32 modulation and 5-D patch embedding, F16 embeddings/head, block linears in `--qtype`), loads
it with `load_wan_model(path)` onto the host (load_device=offload_device), reports the loaded weight bytes against
the file size, then runs bench/memory.py's capped case: block swap auto under a 12 GB cap, one speaker, 480x832.

    python bench/gguf_14b.py --qtype Q4_K --cap 12
"""
import argparse
import os
import time

import torch

from _common import add_clip_size_args, import_pack, reference_shapes, write_result
from forward import random_fetch
from gguf_weights import blocks_for, quantized_by_city96

GIB = 2**30


def write_gguf(path: str, shapes: dict, qtype: str, device="cuda") -> None:
    import gguf
    gen = torch.Generator(device=device).manual_seed(0)
    fetch = random_fetch(shapes, torch.device(device), torch.float32, gen)
    writer = gguf.GGUFWriter(path=None, arch="wan")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, shape in shapes.items():
        tensor, _ = fetch(key)
        if quantized_by_city96(key, shape, qtype):
            data, kind = blocks_for(tensor, qtype, gen).cpu().numpy(), qtype
        elif tensor.dim() == 1 or tensor.numel() <= 1024 or "modulation" in key or tensor.dim() == 5:
            data, kind = tensor.cpu().numpy(), "F32"
        else:
            data, kind = tensor.half().cpu().numpy(), "F16"
        writer.add_tensor(key, data, raw_dtype=gguf.GGMLQuantizationType[kind])
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--listing", default="keys_infinitetalk.txt")
    p.add_argument("--qtype", default="Q4_K")
    p.add_argument("--cap", type=float, default=12.0, help="GB (1e9 bytes) the process may use")
    p.add_argument("--path", default=os.path.join(os.environ.get("WANTALK_BENCH_DIR", "/tmp"), "wan14b_it_{q}.gguf"))
    add_clip_size_args(p)
    p.add_argument("--prefetch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--tile", type=int, default=256)
    args = p.parse_args()
    import_pack()
    from memory import capped_case
    from wantalk.wanvideo.loader import load_wan_model
    path = args.path.format(q=args.qtype)
    t0 = time.perf_counter()
    write_gguf(path, reference_shapes(args.listing), args.qtype)
    write_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = load_wan_model(path, device="cpu")
    load_s = time.perf_counter() - t0
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    file_bytes = os.path.getsize(path)
    print(f"wrote {file_bytes / GIB:.2f} GiB in {write_s:.0f}s; loaded in {load_s:.1f}s: weights "
          f"{weight_bytes / GIB:.2f} GiB ({weight_bytes / file_bytes:.3f}x the file)")
    total = torch.cuda.get_device_properties(0).total_memory
    args.vae = False
    result = capped_case(model, args, total, args.cap, f"gguf_{args.qtype}", None, 3)
    write_result("gguf_14b", {"bench": "gguf_14b", "qtype": args.qtype, "file_gib": file_bytes / GIB,
                              "weights_gib": weight_bytes / GIB, "write_s": write_s, "load_s": load_s, **result,
                              "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                              "date": time.strftime("%Y-%m-%d")})
    print(result)
    os.remove(path)


if __name__ == "__main__":
    main()
