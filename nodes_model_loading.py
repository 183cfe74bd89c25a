"""Model loading nodes: thin wrappers over `wanvideo.loader`."""
from __future__ import annotations

import logging
import weakref

import torch

from . import host, validation
from .nodes_common import CATEGORY, MODEL_TYPE, NodeInputError
from .wanvideo.loader import BASE_DTYPES, load_wan_model, plan_load
from .wanvideo.lora import LoraError, LoraModeError, attach_unmerged_loras
from .wanvideo.modules.attention import ATTENTION_MODES
from .wanvideo.quantization import DEFAULT_PARAMS_TO_KEEP, QUANTIZATION_MODES, QuantizationModeError

log = logging.getLogger("wantalk")

LORA_MODES = ("merge", "unmerged")


def expected_model_bytes(paths: list[str], quantization: str, base_dtype=torch.bfloat16, params_to_keep=None,
                         loras=()) -> int:
    """What the loaded model will occupy on the load device: the layer plan's bytes, from the files' headers
    (no tensor is read; GGUF blocks and pre-quantized layers count as stored, layers a merged LoRA changes as they
    are stored after the merge). Bytes do not depend on the matmul path, so no compute device is planned for (nor
    warned about)."""
    planned, _ = plan_load(paths[0], extra_weights=tuple(paths[1:]), quantization=quantization,
                           base_dtype=base_dtype, params_to_keep=params_to_keep, loras=loras, compute_device=None)
    return planned.weight_bytes


def addon_files() -> list[str]:
    """InfiniteTalk / HuMo add-on candidates: ComfyUI's model_patches folder, then diffusion_models."""
    return ["none"] + host.model_files("model_patches") + host.model_files("diffusion_models")


def resolve_addon(name: str) -> str:
    for kind in ("model_patches", "diffusion_models"):
        try:
            return host.model_path(kind, name)
        except host.ModelPathError:
            raise  # outside every model folder: the same answer for each kind
        except FileNotFoundError:
            continue
    raise FileNotFoundError(f"add-on file '{name}' is neither in models/model_patches nor in models/diffusion_models")


class WanTalkModelLoader:
    DESCRIPTION = ("Loads a Wan 2.1 diffusion model (T2V/I2V, InfiniteTalk, MultiTalk, HuMo) from any bf16/fp16/fp8/"
                   "fp8-scaled/nvfp4 file or a GGUF (city96 Q2_K..Q8_0), quantizing while it streams weights from disk.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (host.model_files("diffusion_models"), {
                    "tooltip": "Wan 2.1 diffusion model from models/diffusion_models (a combined InfiniteTalk or HuMo "
                               "file works too). bf16, fp16, fp8, fp8-scaled, nvfp4 and GGUF files (city96's Q2_K to "
                               "Q8_0) are recognised automatically; GGUF weights stay in their blocks (file-sized)."}),
                "base_precision": (list(BASE_DTYPES), {
                    "default": "bf16",
                    "tooltip": "Precision of the layers that are not quantized and of the matmuls of non-fast modes. "
                               "bf16 is right for almost everyone; fp16 for GPUs without bf16."}),
                "quantization": (list(QUANTIZATION_MODES), {
                    "default": "disabled",
                    "tooltip": "How linear weights are stored. fp8_e4m3fn_scaled: half the memory of bf16 with "
                               "per-channel scales (best quality of the fp8 modes). _fast: fp8 matmuls on RTX 40xx / "
                               "H100 and newer. fp4: a quarter of bf16, works on any CUDA GPU; fp4_scaled_fast "
                               "adds fp8 matmuls (RTX 40xx / H100) or native FP4 matmuls (Blackwell). GGUF files: "
                               "'disabled' keeps their blocks; only Q8_0 files take an fp8/fp4 mode."}),
                "attention_mode": (list(ATTENTION_MODES), {
                    "default": "auto",
                    "tooltip": "Attention kernel. auto picks the fastest kernel that is correct for each shape on "
                               "your GPU (on H100/H200/B200 FlashAttention-4 for long self-attention when the "
                               "optional flash-attn-4 package is installed, ~1.19x cuDNN; its first use compiles for "
                               "~2 s); the others pin a kernel and fall back (with a log line) where it cannot "
                               "serve a shape correctly. int8_triton: the pack's 8-bit kernel (Triton, no build "
                               "step), ~1.38x cuDNN on H200, outputs a few percent off exact attention."}),
                "load_device": (["main_device", "offload_device"], {
                    "default": "main_device",
                    "tooltip": "Where the weights are placed after loading. offload_device keeps them in CPU RAM "
                               "(use with block swap on small GPUs)."}),
            },
            "optional": {
                "addon_model": (addon_files(), {
                    "default": "none",
                    "tooltip": "InfiniteTalk / MultiTalk / HuMo weights stored separately from the Wan base model "
                               "(models/model_patches or models/diffusion_models). 'none' when the model file "
                               "already contains them."}),
                "params_to_keep": ("STRING", {
                    "default": ", ".join(DEFAULT_PARAMS_TO_KEEP),
                    "tooltip": "Comma-separated name fragments: a parameter whose name contains one of them stays in "
                               "the base precision (norms, biases, embeddings, modulation, head, audio projection)."}),
                "lora": ("WANTALK_LORA", {
                    "tooltip": "LoRAs from WanTalk LoRA nodes (e.g. a lightx2v distill LoRA for 4-8 steps)."}),
                "lora_mode": (list(LORA_MODES), {
                    "default": "merge",
                    "tooltip": "merge: LoRAs are merged into the weights while loading, before quantization - "
                               "works with every quantization and costs nothing per step. unmerged: applied at "
                               "run time (only with quantization 'disabled' and a bf16/fp16 file)."}),
            },
        }

    def __init__(self):
        # The model this node last loaded with unmerged LoRAs, by its load settings (weakly held: ComfyUI decides
        # its lifetime), so a strength change re-uses it instead of reloading.
        self._unmerged = (None, lambda: None)

    RETURN_TYPES = (MODEL_TYPE, "STRING")
    RETURN_NAMES = ("model", "quantization_report")
    OUTPUT_TOOLTIPS = ("The loaded Wan model for the wantalk sampler.",
                       "Which layers were quantized and which kept, with their sizes.")
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, model, base_precision, quantization, attention_mode, load_device,
             addon_model="none", params_to_keep=None, lora=None, lora_mode="merge"):
        node = "Load Wan Model"
        validation.widgets(node, self.INPUT_TYPES(), {"base_precision": base_precision, "quantization": quantization,
                                                      "attention_mode": attention_mode, "load_device": load_device,
                                                      "lora_mode": lora_mode, "params_to_keep": params_to_keep})
        try:
            path = host.model_path("diffusion_models", model)
        except FileNotFoundError as exc:
            raise NodeInputError(node, "model", f"{exc}") from None
        extra = []
        if addon_model and addon_model != "none":
            try:
                extra.append(resolve_addon(addon_model))
            except FileNotFoundError as exc:
                raise NodeInputError(node, "addon_model", str(exc)) from None
        loras = validation.lora_chain(node, "lora", lora)
        if loras and lora_mode == "unmerged" and quantization != "disabled":
            raise NodeInputError(node, "lora_mode", f"unmerged LoRAs cannot run on quantization '{quantization}'; "
                                 f"use lora_mode 'merge' (merged before quantization, no run-time cost).")
        device = host.torch_device() if load_device == "main_device" else host.offload_device()
        settings = (path, base_precision, quantization, attention_mode, str(device), tuple(extra), params_to_keep,
                    tuple(p for p, _ in loras))
        cached_settings, cached = self._unmerged
        reused = cached() if lora_mode == "unmerged" and loras and cached_settings == settings else None
        if reused is not None:
            try:
                for index, (_, strength) in enumerate(loras):
                    reused.unmerged_loras.set_strength(index, strength)
                return (reused, reused.quant_report.summary())
            except LoraError as exc:  # e.g. norm deltas already copied by block swap: load afresh
                log.info("wantalk: reloading instead of changing LoRA strengths: %s", exc)
        merged = loras if lora_mode == "merge" else ()
        if device.type == "cuda":
            try:
                host.free_memory(expected_model_bytes([path, *extra], quantization, BASE_DTYPES[base_precision],
                                                      params_to_keep, merged), device)
            except ValueError:
                pass  # an unreadable file is reported by the loader below, with its reason
        try:
            wan = load_wan_model(path, device=device, base_dtype=BASE_DTYPES[base_precision],
                                 quantization=quantization, attention_mode=attention_mode,
                                 params_to_keep=params_to_keep, extra_weights=tuple(extra),
                                 loras=merged, compute_device=host.torch_device())
            if loras and lora_mode == "unmerged":
                attach_unmerged_loras(wan, loras)
                self._unmerged = (settings, weakref.ref(wan))
        except LoraError as exc:
            raise NodeInputError(node, "lora_mode" if isinstance(exc, LoraModeError) else "lora", str(exc)) from None
        except QuantizationModeError as exc:
            raise NodeInputError(node, "quantization", str(exc)) from None
        except ValueError as exc:
            raise NodeInputError(node, "model" if not extra else "model/addon_model", str(exc)) from None
        except torch.cuda.OutOfMemoryError:
            raise NodeInputError(node, "quantization", "the model does not fit in GPU memory: choose an fp8 or fp4 "
                                 "quantization, or load_device 'offload_device' with block swap.") from None
        return (wan, wan.quant_report.summary())


NODE_CLASS_MAPPINGS = {"WanTalkModelLoader": WanTalkModelLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"WanTalkModelLoader": "Load Wan Model (wantalk)"}
