"""Loading a Wan 2.1 DiT (plus InfiniteTalk / HuMo add-ons) from checkpoint files.

The config is inferred from tensor shapes; the model is built on the meta device, the quantization policy is
applied once, then tensors stream from disk one at a time onto the load device (quantized on the way).
"""
from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass

import torch

from . import quantization as policy
from .checkpoint import CheckpointError, CheckpointReader, checked_tensor, config_hints, describe_foreign, strip_prefix
from .gguf import GGUFCheckpoint, is_gguf
from .modules import cast_ops
from .modules.model import WanConfig, WanModel
from .modules.attention import ATTENTION_MODES

log = logging.getLogger("wantalk")

BASE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class AddOn:
    """A model add-on recognised from its keys: its config and the block adapter factory to build it."""
    name: str
    config: object
    adapter_factory: object
    top_level: dict  # name -> nn.Module factory(cfg, device, dtype, operations) for top-level modules


def addon_detectors():
    """Add-on detectors in priority order; each maps (shapes, cfg) -> AddOn | None."""
    detectors = []
    try:
        from ..multitalk.model_addon import detect_infinitetalk
        detectors.append(detect_infinitetalk)
    except ImportError:
        pass
    try:
        from ..humo.model_addon import detect_humo
        detectors.append(detect_humo)
    except ImportError:
        pass
    return detectors


def _head_count(dim: int, hints: dict) -> int:
    if "num_heads" in hints:
        heads = int(hints["num_heads"])
        if heads < 1 or dim % heads:
            raise CheckpointError(f"num_heads {heads} (from the file's config) does not divide the model dim {dim}; "
                                  f"fix or remove the config value.")
        return heads
    if dim % 128 == 0:
        return dim // 128  # every published Wan 2.1 model uses head_dim 128
    raise CheckpointError(f"cannot infer the number of attention heads for model dim {dim} (not a multiple of 128); "
                          f"pass config_overrides={{'num_heads': N}} or put <file name>.config.json beside the file.")


def infer_config(shapes: dict[str, tuple], hints: dict | None = None, source: str = "checkpoint") -> WanConfig:
    """WanConfig from the shapes of the (prefix-stripped) base keys."""
    hints = dict(hints or {})
    need = ["patch_embedding.weight", "text_embedding.0.weight", "time_embedding.0.weight", "head.head.weight",
            "blocks.0.ffn.0.weight"]
    missing = [k for k in need if k not in shapes]
    if missing:
        raise CheckpointError(f"{source}: not a Wan 2.1 diffusion model; missing {', '.join(missing)}.")
    pe = shapes["patch_embedding.weight"]
    if len(pe) != 5:
        raise CheckpointError(f"{source}: patch_embedding.weight has shape {pe}; expected a Conv3d weight "
                              f"(dim, in_dim, 1, 2, 2). This is not a Wan 2.1 layout.")
    dim, in_dim, patch = pe[0], pe[1], tuple(pe[2:])
    layers = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k)))
    out_dim = shapes["head.head.weight"][0] // (patch[0] * patch[1] * patch[2])
    cfg = WanConfig(dim=dim, ffn_dim=shapes["blocks.0.ffn.0.weight"][0], num_heads=_head_count(dim, hints),
                    num_layers=layers, in_dim=in_dim, out_dim=out_dim, text_dim=shapes["text_embedding.0.weight"][1],
                    freq_dim=shapes["time_embedding.0.weight"][1], patch_size=patch,
                    image_branch="blocks.0.cross_attn.k_img.weight" in shapes,
                    clip_dim=shapes.get("img_emb.proj.1.weight", (0, 1280))[1])
    for key in ("text_len", "eps"):
        if key in hints:
            cfg = cfg.with_(**{key: type(getattr(cfg, key))(hints[key])})
    checks = {"text_embedding.2.weight": (dim, dim), "blocks.0.self_attn.q.weight": (dim, dim),
              "blocks.0.ffn.2.weight": (dim, cfg.ffn_dim), "time_projection.1.weight": (6 * dim, dim),
              "blocks.0.modulation": (1, 6, dim)}
    for key, expect in checks.items():
        if key in shapes and tuple(shapes[key]) != expect:
            raise CheckpointError(f"{source}: '{key}' has shape {tuple(shapes[key])}, expected {expect} for a Wan "
                                  f"model of dim {dim}; the file fits no known Wan 2.1 layout.")
    return cfg


def build_model(cfg: WanConfig, addon: AddOn | None, *, device, dtype) -> WanModel:
    factory = addon.adapter_factory if addon else None
    model = WanModel(cfg, device=device, dtype=dtype, audio_adapter_factory=factory)
    if addon:
        for name, make in addon.top_level.items():
            model.add_module(name, make(cfg, device=device, dtype=dtype, operations=cast_ops))
    return model


class _Sources:
    """Merged view over several checkpoint files; later files override earlier ones key by key."""

    def __init__(self, paths: list[str]):
        self.readers = [GGUFCheckpoint(p) if is_gguf(p) else CheckpointReader(p) for p in paths]
        self.where: dict[str, tuple[CheckpointReader, str]] = {}
        self.aux: dict[str, dict[str, tuple[CheckpointReader, str]]] = {}
        self.scaled_fp8_files: list[CheckpointReader] = []  # files with the `scaled_fp8` marker
        for reader in self.readers:
            keys = reader.keys()
            prefix = strip_prefix(keys)
            for raw in keys:
                key = raw[len(prefix):] if prefix and raw.startswith(prefix) else raw
                if key in policy.GLOBAL_MARKERS:
                    self.scaled_fp8_files.append(reader)
                    continue
                base, _, suffix = key.rpartition(".")
                if suffix in policy.AUX_SUFFIXES:
                    self.aux.setdefault(base + ".weight", {})[suffix] = (reader, raw)
                else:
                    self.where[key] = (reader, raw)

    def shapes(self) -> dict[str, tuple]:
        """Logical shapes (packed NVFP4 weights count their unpacked width)."""
        return {k: policy.logical_shape(r.shape(raw), self.aux.get(k, {}).keys()) for k, (r, raw) in self.where.items()}

    def get(self, key: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        reader, raw = self.where[key]
        aux = {s: r.get(rk) for s, (r, rk) in self.aux.get(key, {}).items()}
        if isinstance(reader, GGUFCheckpoint):
            tensor, marker = reader.stored(raw)
            return tensor, {**aux, **marker}
        return reader.get(raw), aux

    def stored_formats(self) -> dict[str, str]:
        """Key -> storage of every tensor as the headers say (`quantization.stored_storage`), no tensor read;
        refuses a scaled fp8 file whose fp8 weights lack their scales."""
        formats = {k: policy.stored_storage(r.dtype_name(raw), self.aux.get(k, {}).keys())
                   for k, (r, raw) in self.where.items()}
        for reader in self.scaled_fp8_files:
            fp8 = [k for k, (r, _) in self.where.items() if r is reader and formats[k].startswith("float8")]
            policy.check_scaled_fp8(reader.path, fp8, {k: self.aux.get(k, {}).keys() for k in fp8})
        return formats


@dataclass
class LoadPlan:
    """Everything decided from the file headers before any tensor is read: the config, the add-on, the model
    built on the meta device with every linear layer as planned, the plan itself and its report."""
    model: WanModel
    addon: AddOn | None
    plan: dict[str, policy.LayerPlan]
    report: policy.QuantReport
    fetch: object                   # key -> (tensor, aux), the add-on's key renames applied
    expected: dict[str, tuple]      # model key -> logical shape, in load order

    @property
    def weight_bytes(self) -> int:
        """What the loaded weights will occupy on the load device."""
        return self.report.quantized_bytes + self.report.kept_bytes


@dataclass
class WanHandle:
    """A loaded model and what produced it: the model, its config, the layer plan and report, the add-on,
    the merged LoRAs and every source file with its role ("model", "addon", "lora")."""
    model: WanModel
    config: WanConfig
    plan: dict[str, policy.LayerPlan]
    report: policy.QuantReport
    addon: str | None
    loras: tuple[tuple[str, float], ...]
    sources: tuple[tuple[str, str], ...]

    @property
    def source_paths(self) -> tuple[str, ...]:
        return tuple(p for _, p in self.sources)


def plan_load(path: str, *, base_dtype=torch.bfloat16, quantization: str = "disabled", params_to_keep=None,
              extra_weights=(), config_overrides: dict | None = None, loras=(), compute_device="cpu"):
    """Open the files, read their headers and plan the load (no tensor is read): `(LoadPlan, LoRA transforms)`."""
    paths = [path, *extra_weights]
    sources = _Sources(paths)
    foreign = describe_foreign(sources.readers[0].keys())
    if foreign:
        raise CheckpointError(f"'{path}' is {foreign}.")
    hints = config_hints(path, sources.readers[0].metadata)
    hints.update(config_overrides or {})
    stored = sources.stored_formats()
    transforms = []
    if loras:
        _refuse_gguf_loras(loras)
        from .lora import lora_merge_transform
        transforms.append(lora_merge_transform(loras, sources.shapes()))
        stored = policy.merged_storage(stored, transforms[-1].targets)
    planned = plan_model(sources.shapes(), sources.get, base_dtype=base_dtype, quantization=quantization,
                         params_to_keep=params_to_keep, hints=hints, files=paths, stored=stored,
                         compute_device=compute_device)
    return planned, transforms


def load_wan(path: str, *, device="cpu", base_dtype=torch.bfloat16, quantization: str = "disabled",
             attention_mode: str = "auto", params_to_keep=None, extra_weights=(),
             config_overrides: dict | None = None, loras=(), compute_device=None) -> WanHandle:
    """Load a Wan 2.1 DiT (optionally with add-on files in `extra_weights`) ready for inference.

    loras: `(path, strength)` pairs merged into the high-precision weights while streaming, before quantization.
    compute_device: where the layers will run (plans their matmul path); default `device`.
    """
    t0 = time.perf_counter()
    planned, transforms = plan_load(path, base_dtype=base_dtype, quantization=quantization,
                                    params_to_keep=params_to_keep, extra_weights=extra_weights,
                                    config_overrides=config_overrides, loras=loras,
                                    compute_device=compute_device or device)
    model = materialise(planned, device=device, base_dtype=base_dtype, attention_mode=attention_mode,
                        files=[path, *extra_weights], weight_transforms=transforms)
    # How to load the same model again: the multi-GPU workers do (wanvideo.parallel).
    model.load_recipe = {"path": path, "base_dtype": str(base_dtype).removeprefix("torch."),
                         "quantization": quantization, "attention_mode": attention_mode,
                         "params_to_keep": params_to_keep, "extra_weights": tuple(extra_weights),
                         "config_overrides": config_overrides, "loras": tuple(tuple(x) for x in loras)}
    sources = (("model", path), *(("addon", p) for p in extra_weights), *(("lora", p) for p, _ in loras))
    cfg = model.cfg
    handle = WanHandle(model, cfg, planned.plan, planned.report, model.addon_name,
                       tuple((p, float(s)) for p, s in loras), sources)
    model.source_paths = handle.source_paths  # file identities for the resume key (wanvideo.resume)
    log.info("wantalk: loaded %s (%s, dim %d, %d layers%s) in %.1fs; %s", os.path.basename(path), cfg.model_type,
             cfg.dim, cfg.num_layers, f", {model.addon_name}" if model.addon_name else "",
             time.perf_counter() - t0, planned.report.summary())
    return handle


def load_wan_model(path: str, **kwargs) -> WanModel:
    """`load_wan(...)`'s model (the module the nodes pass along), for callers that need only the module."""
    return load_wan(path, **kwargs).model


def plan_model(shapes: dict[str, tuple], fetch, *, base_dtype=torch.bfloat16, quantization: str = "disabled",
               params_to_keep=None, hints: dict | None = None, files=("checkpoint",), stored=None,
               compute_device="cpu") -> LoadPlan:
    """Infer the config from `shapes`, build on meta, plan every linear layer (from `stored`: key -> storage as
    the headers say, absent = dense; the mode; the device the layers will run on) and give it its module."""
    if isinstance(base_dtype, str):
        base_dtype = BASE_DTYPES[base_dtype]
    cfg = infer_config(shapes, hints, source=f"'{files[0]}'")
    addon = None
    for detect in addon_detectors():
        addon = detect(shapes, cfg)
        if addon is not None:
            cfg = cfg.with_(audio=addon.config)
            shapes, fetch, stored = _renamed(shapes, fetch, stored or {}, getattr(addon, "key_renames", {}))
            break
    with torch.device("meta"):
        model = build_model(cfg, addon, device="meta", dtype=base_dtype)
    expected = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    if missing or unexpected:
        raise CheckpointError(_key_mismatch_message(files, missing, unexpected))
    for key, shape in expected.items():
        if shape != tuple(shapes[key]):
            raise CheckpointError(f"'{key}' has shape {tuple(shapes[key])} in the checkpoint but the model inferred "
                                  f"from it needs {shape}; are the files from different models "
                                  f"(e.g. a 14B add-on on a 1.3B model)?")
    keep = policy.parse_params_to_keep(params_to_keep)
    plan = policy.plan_layers(model, quantization, keep, stored, compute_device)
    report = policy.apply_plan(model, plan, quantization, base_dtype=base_dtype)
    return LoadPlan(model, addon, plan, report, fetch, expected)


def materialise(planned: LoadPlan, *, device="cpu", base_dtype=torch.bfloat16, attention_mode: str = "auto",
                files=("checkpoint",), weight_transforms=()) -> WanModel:
    """Stream every tensor from `planned.fetch(key) -> (tensor, aux)` one at a time onto `device` into the
    planned model.

    weight_transforms: callables `(key, float32 tensor) -> tensor | None` (None: leave the key alone), applied to
    the high-precision value BEFORE quantization (LoRA merging); stored quantized weights are dequantized first."""
    if isinstance(base_dtype, str):
        base_dtype = BASE_DTYPES[base_dtype]
    if attention_mode not in ATTENTION_MODES:
        raise ValueError(f"unknown attention_mode '{attention_mode}'; expected one of {', '.join(ATTENTION_MODES)}")
    model, device = planned.model, torch.device(device)
    source = ", ".join(f"'{f}'" for f in files)
    for key, shape in planned.expected.items():
        tensor, aux = planned.fetch(key)
        tensor = checked_tensor(tensor, key, source, device)  # on the load device: one reduction per tensor
        aux = {name: checked_tensor(value, f"{key} ({name})", source) for name, value in aux.items()}
        tensor, aux = _transformed(key, tensor, aux, shape, weight_transforms, device,
                                   planned.plan.get(key.removesuffix(".weight")))
        policy.load_param(model, key, tensor, aux=aux, device=device, base_dtype=base_dtype)
    leftover = [n for n, p in model.named_parameters() if p.is_meta] + [n for n, b in model.named_buffers() if b.is_meta]
    if leftover:
        raise CheckpointError(f"internal: parameters not loaded: {leftover[:5]}")
    model.eval().requires_grad_(False)
    model.set_attention_mode(attention_mode)
    model.layer_plan = planned.plan
    model.addon_name = planned.addon.name if planned.addon else None
    return model


def assemble_model(shapes: dict[str, tuple], fetch, *, device="cpu", base_dtype=torch.bfloat16,
                   quantization: str = "disabled", attention_mode: str = "auto", params_to_keep=None,
                   hints: dict | None = None, files=("checkpoint",), weight_transforms=(), stored=None,
                   compute_device=None) -> WanModel:
    """`plan_model` then `materialise`: a model from shapes and a fetch function (benches, tests, workers)."""
    planned = plan_model(shapes, fetch, base_dtype=base_dtype, quantization=quantization,
                         params_to_keep=params_to_keep, hints=hints, files=files, stored=stored,
                         compute_device=compute_device or device)
    return materialise(planned, device=device, base_dtype=base_dtype, attention_mode=attention_mode, files=files,
                       weight_transforms=weight_transforms)


def _transformed(key: str, tensor: torch.Tensor, aux: dict, shape: tuple[int, ...], transforms, device,
                 planned: policy.LayerPlan | None = None):
    """Apply the weight transforms that touch `key` (logical `shape`, its layer `planned`), on `device`, in
    float32."""
    for transform in transforms:
        targets = getattr(transform, "targets", None)
        if targets is not None and key not in targets:
            continue  # untouched weights stream as stored: no dequantization, no extra time
        stored = policy.decode_stored(key, tensor.to(device), {k: v.to(device) for k, v in aux.items()}, shape)
        out = transform(key, stored.dense(shape, torch.float32))
        if out is not None:
            tensor, aux = policy.restored(out, planned)
    return tensor, aux


def _refuse_gguf_loras(loras) -> None:
    from .lora import refuse_gguf_lora
    for lora_path, _ in loras:
        refuse_gguf_lora(lora_path)


def _renamed(shapes: dict, fetch, stored: dict, renames: dict[str, str]):
    """Apply an add-on's key-prefix renames (e.g. `multitalk_audio_proj.` -> `audio_proj.`) to shapes, fetch and
    the stored formats."""
    if not renames:
        return shapes, fetch, stored
    def new_name(key):
        for old, new in renames.items():
            if key.startswith(old):
                return new + key[len(old):]
        return key
    original = {new_name(k): k for k in shapes}
    return ({new_name(k): v for k, v in shapes.items()}, (lambda key: fetch(original[key])),
            {new_name(k): v for k, v in stored.items()})


def _key_mismatch_message(paths, missing, unexpected) -> str:
    files = ", ".join(f"'{p}'" for p in paths)
    parts = [f"the checkpoint keys of {files} do not match the model inferred from them."]
    if missing:
        parts.append(f"{len(missing)} missing (first: {', '.join(missing[:6])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (first: {', '.join(unexpected[:6])})")
    if any(k.startswith("blocks.") and ("audio" in k or "norm_x" in k) for k in missing):
        parts.append("Audio layers are missing: give the InfiniteTalk/HuMo file too, or use the matching base model.")
    return " ".join(parts)
