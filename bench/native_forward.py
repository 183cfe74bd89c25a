"""ComfyUI core's native Wan 2.1 I2V 14B + InfiniteTalk forward and ours, side by side in one process.

Ratios against native are only meaningful measured in one run on one machine (clocks, drivers and cuDNN plans
move between calls). ComfyUI's own classes are imported from its source tree (`--comfyui-dir` or COMFYUI_DIR) and
run the way its nodes run them:
- the diffusion model `comfy.ldm.wan.model.WanModel` (i2v) built as the UNET loader builds it: weight dtype
  `fp8_e4m3fn_fast` = float8_e4m3fn weights with `comfy.ops.fp8_ops` (FP8 matmuls through comfy_kitchen's
  `_scaled_mm` dispatch), or bf16 weights with `comfy.ops.disable_weight_init`;
- InfiniteTalk as `WanInfiniteTalkToVideo` attaches it: the model patch's per-block audio attention
  (`WanMultiTalkAttentionBlock`, bf16 weights as a dynamic-VRAM load keeps a bf16 file, `comfy.ops.manual_cast`)
  called per block through `MultiTalkCrossAttnPatch` as an `attn2_patch`, with the projected audio in
  `transformer_options["audio_embeds"]` (the node projects the audio once, outside the forward, as our
  conditioning does);
- attention: ComfyUI's `optimized_attention` (PyTorch SDPA on NVIDIA) with cuDNN first in SDPA's priority, as
  ComfyUI sets it on Windows and as the issue's native figures were taken.
Both models get random weights of a realistic scale (fan-in scaled), the same latents, text and CLIP features;
one at a time is built, timed (median of `--repeats` after one warm-up), and freed. Ours goes first: its inputs
are made from its config, and the audio conditioning needs its audio projection.

ComfyUI's imports beyond torch/numpy/safetensors: einops, psutil, tqdm, packaging, comfy_kitchen, comfy_aimdo
(imported, never initialised here). They are looked up on the path and in the ComfyUI folder itself (copy them
there from ComfyUI's venv when the machine lacks them). comfy_kitchen's pure-Python part suffices for the FP8
linear (`torch._scaled_mm`); its compiled CUDA backend (142 MB, one Python version) also fuses the rotary embedding:
without it the rope would run as ComfyUI's eager fallback, several full-size elementwise passes per block, so on a
GPU comfy_kitchen's Triton backend (fused rope kernels) is enabled, as `--enable-triton-backend` does; the backends in
use are printed. Pillow is imported by `comfy.utils` for image helpers this forward never calls: where it is absent,
empty stand-in `PIL` modules are put into `sys.modules` for this process only (`stub_pillow`).

    COMFYUI_DIR=/path/to/ComfyUI python3 bench/native_forward.py --precision fp8
    python3 bench/native_forward.py --comfyui-dir .comfy_src --precision bf16 --top-kernels 15   # + both profiles
    python3 bench/native_forward.py --comfyui-dir .comfy_src --attention auto,int8_triton   # our 8-bit row too
    python3 bench/native_forward.py --comfyui-dir /work/comfy/ComfyUI --tiny     # CPU smoke test, tiny model
"""
import argparse
import gc
import importlib.abc
import importlib.util
import importlib.machinery
import logging
import os
import re
import sys
import time
import types
from contextlib import nullcontext

import torch

from _common import add_clip_size_args, cuda_time, import_pack, reference_shapes, write_result
from forward import build_model, forward_inputs, print_top_kernels, profiled, run_forward

LISTING = "keys_infinitetalk.txt"
PRECISIONS = {   # ours -> (ComfyUI weight dtype name, our quantization)
    "fp8": ("fp8_e4m3fn_fast", "fp8_e4m3fn_scaled_fast"),
    "bf16": ("default (bf16)", "disabled"),
}
COMFY_NEEDS = ("einops", "psutil", "tqdm", "packaging", "comfy_kitchen", "comfy_aimdo")
TINY_DIMS = {5120: 640, 13824: 1280, 10240: 1280, 30720: 3840}   # dim, FFN, 2 x dim, 6 x dim; 40 heads still divide


# ------------------------------------------------------------------------------------------------------------
# Importing ComfyUI
# ------------------------------------------------------------------------------------------------------------

def _placeholder(attr: str):
    if attr.startswith("__"):
        raise AttributeError(attr)
    return type(attr, (), {})


class _EmptyPillow(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds `PIL` and every `PIL.*` as empty modules whose attributes are placeholder classes."""

    def find_spec(self, name, path, target=None):
        if name == "PIL" or name.startswith("PIL."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = _placeholder
        return module

    def exec_module(self, module):
        pass


def stub_pillow() -> bool:
    """Stand-in PIL modules (this process only) when Pillow is absent: comfy.utils imports it at module level for
    image helpers the forward never calls. True when stubbed."""
    try:
        import PIL  # noqa: F401
        return False
    except ImportError:
        sys.meta_path.append(_EmptyPillow())
        return True


def import_comfy(comfyui_dir: str, device: torch.device) -> types.SimpleNamespace:
    """ComfyUI's ops, Wan model and InfiniteTalk classes from its source tree (CPU mode when `device` is)."""
    if not os.path.isfile(os.path.join(comfyui_dir, "comfy", "ldm", "wan", "model_multitalk.py")):
        raise SystemExit(f"{comfyui_dir} is not a ComfyUI source tree with native InfiniteTalk "
                         "(comfy/ldm/wan/model_multitalk.py missing): pass --comfyui-dir or set COMFYUI_DIR")
    sys.path.insert(0, os.path.abspath(comfyui_dir))
    missing = [name for name in COMFY_NEEDS if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(f"ComfyUI needs {', '.join(missing)}: copy them from ComfyUI's venv site-packages into "
                         f"{comfyui_dir} (comfy_kitchen without backends/cuda/_C*.so is enough)")
    stubbed = stub_pillow()
    import comfy.cli_args
    comfy.cli_args.args.cpu = device.type == "cpu"
    comfy.cli_args.args.enable_triton_backend = device.type == "cuda"
    import comfy.ldm.wan.model
    import comfy.ldm.wan.model_multitalk
    import comfy.ops
    import comfy.quant_ops
    version = open(os.path.join(comfyui_dir, "comfyui_version.py")).read()
    kitchen = [name for name, info in comfy.quant_ops.ck.list_backends().items()
               if info["available"] and not info["disabled"]]
    return types.SimpleNamespace(ops=comfy.ops, wan=comfy.ldm.wan.model, multitalk=comfy.ldm.wan.model_multitalk,
                                 pillow_stubbed=stubbed, kitchen_backends=kitchen,
                                 version=re.search(r"['\"](.+?)['\"]", version).group(1))


# ------------------------------------------------------------------------------------------------------------
# The native model
# ------------------------------------------------------------------------------------------------------------

def randomize_(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Random weights of a realistic scale, written into each parameter in its own dtype (fan-in scaled matrices,
    norm gains near 1, small vectors), as bench/forward.py's `random_fetch` makes ours."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            t = torch.randn(p.shape, device=p.device, generator=generator)
            if p.dim() >= 2:
                t /= p[0].numel() ** 0.5
            elif "norm" in name and name.endswith("weight"):
                t = 1 + 0.1 * t
            else:
                t *= 0.1
            p.copy_(t.to(p.dtype))


def build_native(comfy, cfg, shapes: dict, precision: str, device: torch.device):
    """ComfyUI's Wan I2V model at our config's size, and the per-block audio attention of its InfiniteTalk model
    patch (one `WanMultiTalkAttentionBlock` per block, as comfy_extras' `MultiTalkModelPatch` holds them; built from
    core's class directly since comfy_extras pulls in the node API: Pillow, av, scipy). The patch's audio projection
    runs once per window in the node, not in the forward, so it is not built. Random weights."""
    ops, dtype = (comfy.ops.fp8_ops, torch.float8_e4m3fn) if precision == "fp8" else \
                 (comfy.ops.disable_weight_init, torch.bfloat16)
    model = comfy.wan.WanModel(model_type="i2v", patch_size=cfg.patch_size, text_len=512, in_dim=cfg.in_dim,
                               dim=cfg.dim, ffn_dim=cfg.ffn_dim, freq_dim=cfg.freq_dim, text_dim=cfg.text_dim,
                               out_dim=cfg.out_dim, num_heads=cfg.num_heads, num_layers=cfg.num_layers,
                               qk_norm=True, cross_attn_norm=True, eps=1e-6, device=device, dtype=dtype,
                               operations=ops)
    audio_dim = shapes["audio_proj.norm.weight"][0]
    audio_blocks = torch.nn.ModuleList(
        comfy.multitalk.WanMultiTalkAttentionBlock(cfg.dim, audio_dim, device=device, dtype=torch.bfloat16,
                                                   operations=comfy.ops.manual_cast)
        for _ in range(cfg.num_layers))
    generator = torch.Generator(device=device).manual_seed(1)
    randomize_(model, generator)
    randomize_(audio_blocks, generator)
    return model.eval(), audio_blocks.eval()


def native_forward(comfy, model, audio_blocks, shapes: dict, inputs: dict):
    """One conditional forward the way ComfyUI's sampler calls the diffusion model (image latents concatenated,
    bf16 inputs), InfiniteTalk attached as its node attaches it: an attn2 patch reading the projected audio
    ([1, latent frames, context tokens, audio dim]) from the transformer options."""
    bf16 = torch.bfloat16
    x = torch.cat([inputs["x"], inputs["y"]], dim=1).to(bf16)
    audio_dim = shapes["audio_proj.norm.weight"][0]
    context_tokens = shapes["audio_proj.proj3.weight"][0] // audio_dim
    audio_embeds = torch.randn(1, x.shape[2], context_tokens, audio_dim, device=x.device, dtype=bf16)
    model_patch = types.SimpleNamespace(model=types.SimpleNamespace(blocks=audio_blocks))
    audio_patch = comfy.multitalk.MultiTalkCrossAttnPatch(model_patch, audio_scale=1.0)
    options = {"patches": {"attn2_patch": [audio_patch]}, "audio_embeds": audio_embeds}
    ctx, clip = inputs["ctx"].to(bf16), inputs["clip"].to(bf16)
    return lambda: model(x, inputs["t"], ctx, clip_fea=clip, transformer_options=dict(options))


def cudnn_first(device: torch.device):
    """SDPA with cuDNN first in its priority (what ComfyUI sets on Windows; the issue's native runs used cuDNN)."""
    if device.type != "cuda":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.MATH], set_priority=True)


class _FallbackCounter(logging.Handler):
    """Counts the messages of ComfyUI ("Exception during fp8 op") and comfy_kitchen ("_scaled_mm failed") saying
    an FP8 linear fell back to dequantized weights: the native figure would not be the FP8 path then."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.count = 0

    def emit(self, record):
        message = record.getMessage()
        self.count += "Exception during fp8 op" in message or "_scaled_mm failed" in message


# ------------------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------------------

def median_seconds(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of `fn` after one warm-up call (CUDA events on a GPU, wall clock on CPU)."""
    with torch.no_grad():
        if device.type == "cuda":
            times = cuda_time(fn, warmup=1, repeats=repeats)
        else:
            fn()
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def measure(label: str, fn, args, device: torch.device) -> float:
    """Median seconds of `fn`; with --top-kernels on a GPU also one profiled call: GPU time by kernel category and
    the costliest kernels (which kernels each side runs: cuDNN or not, FP8 GEMMs, rope, norms)."""
    seconds = median_seconds(fn, args.repeats, device)
    if args.top_kernels and device.type == "cuda":
        summary = profiled(fn, args.top_kernels)
        print(f"profile {label}: {summary['by_category_ms']} ms, host gaps {summary.get('host_gaps_ms')} ms")
        print_top_kernels(label, summary, args.top_kernels)
    return seconds


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_ours(shapes, quantization, modes, args, device):
    """Our forward's median seconds with each attention mode in `modes`, and its inputs (reused for the native
    forward)."""
    model, _ = build_model(LISTING, device, quantization, modes[0], shapes=shapes)
    inputs = forward_inputs(model, args.frames, args.height, args.width, device)
    seconds = {mode: measure(f"wantalk, attention {mode}", lambda: run_forward(model, inputs, mode), args, device)
               for mode in modes}
    cfg = model.cfg
    del model
    inputs["audio"] = None
    free(device)
    return seconds, inputs, cfg


def time_native(comfy, cfg, shapes, precision, inputs, args, device):
    model, audio_blocks = build_native(comfy, cfg, shapes, precision, device)
    counter, root = _FallbackCounter(), logging.getLogger()
    level = root.level
    root.addHandler(counter)
    root.setLevel(logging.INFO)   # ComfyUI logs the fallback at info level
    try:
        with cudnn_first(device):
            seconds = measure("ComfyUI native", native_forward(comfy, model, audio_blocks, shapes, inputs), args,
                              device)
    finally:
        root.removeHandler(counter)
        root.setLevel(level)
    del model, audio_blocks
    free(device)
    return seconds, counter.count


def tiny_shapes() -> dict:
    """The InfiniteTalk listing scaled down (dims in TINY_DIMS, 2 blocks), real key names: a CPU smoke test."""
    shapes = {}
    for key, shape in reference_shapes(LISTING).items():
        block = re.match(r"blocks\.(\d+)\.", key)
        if block is None or int(block.group(1)) < 2:
            shapes[key] = tuple(TINY_DIMS.get(n, n) for n in shape)
    return shapes


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--comfyui-dir", default=os.environ.get("COMFYUI_DIR"))
    p.add_argument("--precision", choices=sorted(PRECISIONS), default="fp8")
    p.add_argument("--attention", default="auto", help="our attention mode(s), comma-separated: one row each")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="a 2-block model of dim 640 at 5 frames 64x64 (CPU test)")
    p.add_argument("--top-kernels", type=int, default=0, metavar="N",
                   help="GPU: also profile one forward of each side and print its N costliest kernels")
    add_clip_size_args(p)
    args = p.parse_args()
    if not args.comfyui_dir:
        raise SystemExit("pass --comfyui-dir or set COMFYUI_DIR to ComfyUI's source tree")
    if args.tiny:
        args.frames, args.height, args.width = 5, 64, 64
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    comfy = import_comfy(args.comfyui_dir, device)
    import_pack()
    shapes = tiny_shapes() if args.tiny else reference_shapes(LISTING)
    native_dtype, quantization = PRECISIONS[args.precision]

    ours, inputs, cfg = time_ours(shapes, quantization, args.attention.split(","), args, device)
    native, fallbacks = time_native(comfy, cfg, shapes, args.precision, inputs, args, device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"# {name}, torch {torch.__version__}, ComfyUI {comfy.version}, {cfg.num_layers} blocks dim {cfg.dim}, "
          f"{args.frames} frames {args.height}x{args.width}, median of {args.repeats} after one warm-up"
          + f", comfy_kitchen backends {'/'.join(comfy.kitchen_backends)}"
          + (", Pillow stubbed" if comfy.pillow_stubbed else ""))
    print(f"| {args.precision} forward | seconds | x native |\n|---|---|---|\n"
          f"| ComfyUI native ({native_dtype}, cuDNN-first SDPA) | {native:.3f} | 1.000 |")
    for mode, seconds in ours.items():
        print(f"| wantalk ({quantization}, attention {mode}) | {seconds:.3f} | {seconds / native:.3f} |")
    if fallbacks:
        print(f"WARNING: ComfyUI's FP8 linear fell back to dequantized weights {fallbacks} times: the native "
              "figure is not its FP8 path")
    write_result("native_forward", dict(
        precision=args.precision, native_weight_dtype=native_dtype, quantization=quantization, native_s=native,
        wantalk_s=ours, ratio={mode: seconds / native for mode, seconds in ours.items()},
        native_fp8_fallbacks=fallbacks, tiny=args.tiny, frames=args.frames, size=f"{args.height}x{args.width}",
        comfyui=comfy.version, kitchen_backends=comfy.kitchen_backends, device=name, torch=torch.__version__,
        date=time.strftime("%Y-%m-%d")))


if __name__ == "__main__":
    main()
