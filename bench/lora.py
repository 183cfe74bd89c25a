"""A rank-64 LoRA merged while loading a full-size Wan 2.1 I2V 14B + InfiniteTalk: load time and seconds per
forward, side by side with the same model loaded without the LoRA (before and after it), in one run.

The model is assembled from the official key listing through the pack's loader path with random weights (as
bench/forward.py); the LoRA (lightx2v layout: lora_down/lora_up/alpha on every block linear, diff_b on their
biases, diff on the block norms and modulation) is written to a temporary safetensors file, so the real LoRA
reading and merging path runs.

    python bench/lora.py --listing keys_infinitetalk.txt --quantization fp8_e4m3fn_scaled_fast --rank 64
"""
import argparse
import os
import tempfile
import time

import torch
from safetensors.torch import save_file

from _common import add_clip_size_args, cuda_time, import_pack, reference_shapes, write_result
from forward import forward_inputs, random_fetch, run_forward

BLOCK_LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                 "cross_attn.v", "cross_attn.o", "cross_attn.k_img", "cross_attn.v_img", "ffn.0", "ffn.2")
BLOCK_FULL_DELTAS = ("norm3", "self_attn.norm_q", "self_attn.norm_k", "cross_attn.norm_q", "cross_attn.norm_k",
                     "modulation")


def write_lora(path: str, shapes: dict, rank: int, device) -> int:
    """A random rank-`rank` LoRA for every block linear of the base model; returns its size in bytes."""
    gen = torch.Generator(device=device).manual_seed(1)
    blocks = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("blocks."))
    tensors = {}
    for i in range(blocks):
        for layer in BLOCK_LINEARS:
            name = f"blocks.{i}.{layer}"
            out_features, in_features = shapes[f"{name}.weight"]
            prefix = f"diffusion_model.{name}"
            tensors[f"{prefix}.lora_down.weight"] = torch.randn(rank, in_features, device=device, generator=gen)
            tensors[f"{prefix}.lora_up.weight"] = torch.randn(out_features, rank, device=device, generator=gen) * 1e-3
            tensors[f"{prefix}.alpha"] = torch.tensor(float(rank))
            tensors[f"{prefix}.diff_b"] = torch.randn(out_features, device=device, generator=gen) * 1e-3
        for part in BLOCK_FULL_DELTAS:
            key = f"blocks.{i}.{part}" + ("" if part == "modulation" else ".weight")
            tensors[f"diffusion_model.blocks.{i}.{part}.diff"] = torch.randn(shapes[key], device=device,
                                                                              generator=gen) * 1e-3
    save_file({k: v.to(torch.bfloat16).cpu().contiguous() for k, v in tensors.items()}, path)
    return os.path.getsize(path)


def run_case(shapes, lora_path, args, device) -> dict:
    from wantalk.wanvideo.loader import assemble_model
    from wantalk.wanvideo.lora import lora_merge_transform
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    transforms = [lora_merge_transform([(lora_path, 1.0)], shapes)] if lora_path else []
    gen = torch.Generator(device=device).manual_seed(0)
    model = assemble_model(shapes, random_fetch(shapes, device, torch.bfloat16, gen), device=device,
                           base_dtype=torch.bfloat16, quantization=args.quantization, attention_mode=args.attention,
                           files=(args.listing,), weight_transforms=transforms)
    torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    weights_gib = torch.cuda.memory_allocated() / 2**30
    inputs = forward_inputs(model, args.frames, args.height, args.width, device)
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        times = cuda_time(lambda: run_forward(model, inputs), 1, args.repeats)
    result = {"lora": bool(lora_path), "load_s": load_s, "seconds_per_forward": sorted(times)[len(times) // 2],
              "all_seconds": times, "weights_gib": weights_gib, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
              "addon": model.addon_name}
    del model, inputs
    torch.cuda.empty_cache()
    return result


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--listing", default="keys_infinitetalk.txt")
    p.add_argument("--quantization", default="fp8_e4m3fn_scaled_fast")
    p.add_argument("--attention", default="auto")
    p.add_argument("--rank", type=int, default=64)
    add_clip_size_args(p)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    import_pack()
    device = torch.device("cuda")
    shapes = reference_shapes(args.listing)
    with tempfile.TemporaryDirectory(dir=os.environ.get("WANTALK_BENCH_DIR")) as folder:
        lora_path = os.path.join(folder, f"lora_rank{args.rank}.safetensors")
        t0 = time.perf_counter()
        lora_bytes = write_lora(lora_path, shapes, args.rank, device)
        print(f"wrote a rank-{args.rank} LoRA ({lora_bytes / 2**20:.0f} MiB) in {time.perf_counter() - t0:.1f}s")
        # No LoRA first and again last: the first load also pays one-time start-up (CUDA context, kernel JIT).
        first, lora, base = (run_case(shapes, path, args, device) for path in (None, lora_path, None))
    write_result("lora", {
        "bench": "lora", "listing": args.listing, "quantization": args.quantization, "attention": args.attention,
        "rank": args.rank, "lora_mib": lora_bytes / 2**20, "frames": args.frames, "size": f"{args.height}x{args.width}",
        "no_lora": base, "with_lora": lora, "no_lora_first_load_s": first["load_s"],
        "load_ratio": lora["load_s"] / base["load_s"],
        "forward_ratio": lora["seconds_per_forward"] / base["seconds_per_forward"],
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")})


if __name__ == "__main__":
    main()
