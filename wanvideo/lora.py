"""LoRA for the Wan DiT (and its InfiniteTalk / HuMo layers): reading the published key conventions, merging
into the high-precision weights while the model streams in (before quantization), or applying at run time.

Conventions are recognised per key, so mixed files work:
- `diffusion_model.blocks.N.<layer>.lora_A/lora_B.weight`, `.lora_down/.lora_up.weight` (+ `.alpha`);
- kohya / musubi `lora_unet_blocks_N_<layer>` (underscored; resolved against the model's own layer names,
  never by guessing where the dots were), Wan-Fun's `lora_unet__...`;
- diffusers `transformer.blocks.N.attn1.to_q` (also PEFT `base_model.model.` and kohya-underscored forms);
- `diff` (full weight delta, e.g. norms, `modulation`) and `diff_b` (bias delta).

Merge: `W + strength * (alpha / rank) * up @ down`, in float32; several LoRAs add up.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..fp8_optimization import QuantizedLinear
from .checkpoint import CheckpointError, CheckpointReader, checked_tensor
from .modules.cast_ops import CastLinear

log = logging.getLogger("wantalk")


class LoraError(CheckpointError):
    """A LoRA that cannot be applied, with what was found and what to do."""


class LoraModeError(LoraError):
    """Unmerged (run-time) LoRA asked for on a quantized model."""


# Key suffix -> role. Longest suffixes are matched first.
SUFFIX_ROLES = {
    ".lora_A.default.weight": "down", ".lora_B.default.weight": "up",
    ".lora_A.weight": "down", ".lora_B.weight": "up",
    ".lora_down.weight": "down", ".lora_up.weight": "up",
    ".lora.down.weight": "down", ".lora.up.weight": "up",
    ".alpha": "alpha", ".diff": "diff", ".diff_b": "diff_b",
}
_SUFFIXES = sorted(SUFFIX_ROLES, key=len, reverse=True)
UNSUPPORTED_SUFFIXES = (".dora_scale", ".hada_w1_a", ".lokr_w1", ".lora_mid.weight")

DOTTED_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.", "unet.", "model.")
UNDERSCORED_PREFIXES = ("lora_unet_", "lycoris_", "lora_transformer_")

# Original Wan names -> diffusers (WanTransformer3DModel) names, for module paths.
DIFFUSERS_TOP = {
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out", "head.modulation": "scale_shift_table",
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
}
DIFFUSERS_IN_BLOCK = {
    "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0", "self_attn.norm_q": "attn1.norm_q", "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k", "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0", "cross_attn.norm_q": "attn2.norm_q", "cross_attn.norm_k": "attn2.norm_k",
    "cross_attn.k_img": "attn2.add_k_proj", "cross_attn.v_img": "attn2.add_v_proj",
    "cross_attn.norm_k_img": "attn2.norm_added_k",
    "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2", "norm3": "norm2", "modulation": "scale_shift_table",
}
# The loader renames these add-on prefixes; LoRAs may use either name.
PREFIX_ALIASES = {"multitalk_audio_proj.": "audio_proj."}


def canonical(key: str) -> str:
    for alias, name in PREFIX_ALIASES.items():
        if key.startswith(alias):
            return name + key[len(alias):]
    return key


def diffusers_name(module: str) -> str:
    if module in DIFFUSERS_TOP:
        return DIFFUSERS_TOP[module]
    parts = module.split(".", 2)
    if len(parts) == 3 and parts[0] == "blocks" and parts[2] in DIFFUSERS_IN_BLOCK:
        return f"blocks.{parts[1]}.{DIFFUSERS_IN_BLOCK[parts[2]]}"
    return module


class LayerNames:
    """Every name a LoRA may use for a model layer (original, diffusers, add-on aliases; dotted or
    underscored) -> the layer's canonical module path."""

    def __init__(self, shapes: dict[str, tuple]):
        self.shapes = {canonical(k): tuple(v) for k, v in shapes.items()}
        self.dotted: dict[str, str] = {}
        for key in self.shapes:
            module, _, leaf = key.rpartition(".")
            module = module if leaf in ("weight", "bias") and module else key
            names = {module, diffusers_name(module)}
            names |= {alias + module[len(name):] for alias, name in PREFIX_ALIASES.items() if module.startswith(name)}
            for name in names:
                self.dotted.setdefault(name, module)
        self.underscored = {name.replace(".", "_"): module for name, module in self.dotted.items()}

    def resolve(self, lora_module: str) -> str | None:
        """The canonical module path a LoRA module name refers to, or None."""
        for prefix in UNDERSCORED_PREFIXES:
            if lora_module.startswith(prefix):
                return self.underscored.get(lora_module[len(prefix):].lstrip("_"))
        for prefix in DOTTED_PREFIXES:
            if lora_module.startswith(prefix) and lora_module[len(prefix):] in self.dotted:
                return self.dotted[lora_module[len(prefix):]]
        return self.dotted.get(lora_module)

    def target(self, module: str | None, kind: str) -> str | None:
        """The parameter a delta of `module` changes: for "weight" `<module>.weight` or a bare parameter such
        as `blocks.N.modulation`; for "bias" `<module>.bias`."""
        candidates = (f"{module}.weight", module) if kind == "weight" else (f"{module}.bias",)
        return next((key for key in candidates if module is not None and key in self.shapes), None)


@dataclass
class Patch:
    """One update of one model parameter from one LoRA file: `strength * scale * up @ down` or a full delta."""
    target: str
    source: str                       # the LoRA's key (for messages)
    reader: CheckpointReader
    index: int                        # which LoRA of the chain
    strength: float
    scale: float = 1.0                # alpha / rank (low rank); 1 (full deltas)
    up: str | None = None
    down: str | None = None
    full: str | None = None

    def factors(self, device, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(up `[out, r]`, down `[r, in]`) as matrices."""
        up = self._read(self.up, device, dtype)
        down = self._read(self.down, device, dtype)
        return up.flatten(1), down.flatten(1)

    def _read(self, key: str, device, dtype) -> torch.Tensor:
        """One tensor of the LoRA file on `device`, refused (naming key and file) when it holds NaN/inf."""
        return checked_tensor(self.reader.get(key).to(device=device, dtype=dtype), key, f"LoRA '{self.reader.path}'",
                              error=LoraError)

    def delta(self, shape: tuple, device) -> torch.Tensor:
        """The unscaled-by-strength update (alpha/rank applied) in float32, in the parameter's shape."""
        if self.full is not None:
            return self._read(self.full, device, torch.float32).reshape(shape)
        up, down = self.factors(device)
        return (up @ down).reshape(shape) * self.scale


@dataclass
class LoraFile:
    path: str
    strength: float
    patches: list[Patch]


def _split_key(key: str) -> tuple[str, str] | None:
    for suffix in _SUFFIXES:
        if key.endswith(suffix):
            return key[:-len(suffix)], SUFFIX_ROLES[suffix]
    return None


def _delta_shape(reader: CheckpointReader, role_keys: dict) -> tuple:
    """Shape of a full delta; `(out, in)` of a low-rank product (conv factors flattened)."""
    if "full" in role_keys:
        return tuple(reader.shape(role_keys["full"]))
    up, down = reader.shape(role_keys["up"]), reader.shape(role_keys["down"])
    if len(up) < 2 or len(down) < 2 or up[1] != down[0]:
        raise LoraError(f"'{reader.path}': '{role_keys['up']}' {tuple(up)} and '{role_keys['down']}' {tuple(down)} "
                        f"are not a low-rank pair (up [out, r], down [r, in]); the file is corrupt.")
    return up[0], math.prod(down[1:])


def _check_fits(reader, source: str, target: str, delta_shape: tuple, model_shape: tuple, low_rank: bool) -> None:
    if low_rank:
        fits = len(model_shape) >= 2 and delta_shape == (model_shape[0], math.prod(model_shape[1:]))
    else:
        fits = delta_shape == model_shape
    if not fits:
        raise LoraError(f"LoRA '{reader.path}' was made for a different model: '{source}' changes '{target}' by a "
                        f"{delta_shape} update, but that layer is {model_shape} in this model (e.g. a Wan 1.3B LoRA "
                        f"on a 14B model, or T2V vs I2V). Use a LoRA made for this model.")


def _requests(roles: dict[str, str]) -> tuple[list[tuple[str, dict]], list[str]]:
    """What one LoRA module's keys ask for: [("weight" | "bias", role keys)], and keys that ask for nothing."""
    pair = "up" in roles and "down" in roles
    requests = [("weight", {"up": roles["up"], "down": roles["down"]})] if pair else []
    if "diff" in roles:
        requests.append(("weight", {"full": roles["diff"]}))
    if "diff_b" in roles:
        requests.append(("bias", {"full": roles["diff_b"]}))
    return requests, [] if pair else [roles[r] for r in ("up", "down", "alpha") if r in roles]


def read_lora(path: str, strength: float, names: LayerNames, index: int = 0) -> LoraFile:
    """Parse one LoRA file against the model's layer names; shapes are checked, tensors stay on disk."""
    if not math.isfinite(float(strength)):
        raise LoraError(f"LoRA '{path}': strength {strength} is not a finite number; give e.g. 1.0.")
    try:
        reader = CheckpointReader(path)
    except CheckpointError as exc:  # a damaged LoRA file is the LoRA input's fault, not the model's
        raise LoraError(f"LoRA: {exc}") from None
    keys = reader.keys()
    unsupported = [k for k in keys if k.endswith(UNSUPPORTED_SUFFIXES)]
    if unsupported:
        raise LoraError(f"'{path}' is a DoRA/LyCORIS (LoHa, LoKr, LoCon mid) file ('{unsupported[0]}'); wantalk "
                        f"applies plain LoRA (lora_A/B, lora_down/up, alpha, diff, diff_b) only.")
    groups: dict[str, dict[str, str]] = {}
    unmatched = []
    for key in keys:
        split = _split_key(key)
        if split is None:
            unmatched.append(key)
        else:
            groups.setdefault(split[0], {})[split[1]] = key
    patches = []
    for lora_module, roles in groups.items():
        if ("up" in roles) != ("down" in roles):  # half a low-rank pair: the layer would silently go unpatched
            have, lack = ("up", "down") if "up" in roles else ("down", "up")
            raise LoraError(f"LoRA '{path}' is damaged: '{roles[have]}' has no matching {lack} factor; download "
                            f"the file again.")
        module = names.resolve(lora_module)
        requests, leftover = _requests(roles)
        unmatched += leftover
        for kind, role_keys in requests:
            target = names.target(module, kind)
            if target is None:
                unmatched += list(role_keys.values())
                unmatched += [roles["alpha"]] if "alpha" in roles and "up" in role_keys else []
                continue
            source = next(iter(role_keys.values()))
            low_rank = "up" in role_keys
            _check_fits(reader, source, target, _delta_shape(reader, role_keys), names.shapes[target], low_rank)
            patch = Patch(target, source, reader, index, float(strength), **role_keys)
            if low_rank:
                rank = reader.shape(patch.down)[0]
                alpha = float(reader.get(roles["alpha"]).float().reshape(-1)[0]) if "alpha" in roles else rank
                if not math.isfinite(alpha):
                    raise LoraError(f"LoRA '{path}': '{roles['alpha']}' is {alpha}; the file is damaged (alpha must "
                                    f"be a finite number, usually the rank {rank}).")
                patch.scale = alpha / rank
            patches.append(patch)
    if not patches:
        raise LoraError(f"none of the {len(keys)} keys of LoRA '{path}' matches a layer of this model (first: "
                        f"{', '.join(keys[:4])}). Is it a LoRA for another model family (Wan 2.2, HunyuanVideo, "
                        f"Flux...) or not a LoRA at all?")
    if unmatched:
        more = f" ... (+{len(unmatched) - 20} more)" if len(unmatched) > 20 else ""
        shown = ", ".join(sorted(unmatched)[:20]) + more
        log.warning("wantalk: LoRA '%s': %d of %d keys match no layer of this model and are NOT applied: %s",
                    path, len(unmatched), len(keys), shown)
    return LoraFile(path, float(strength), patches)


def read_loras(loras, shapes: dict[str, tuple]) -> list[LoraFile]:
    """Parse a chain of `(path, strength)` LoRAs against a model's `shapes` (key -> shape)."""
    names = LayerNames(shapes)
    return [read_lora(path, strength, names, i) for i, (path, strength) in enumerate(loras)]


def lora_merge_transform(loras, shapes: dict[str, tuple]):
    """A weight transform for the loader: `(key, float32 tensor) -> merged float32 tensor | None`.

    Every LoRA is parsed and checked against `shapes` here, before any weight is read, so a wrong LoRA fails
    fast. `.targets` lists the keys it changes."""
    by_target: dict[str, list[Patch]] = {}
    for lora in read_loras(loras, shapes):
        for patch in lora.patches:
            if patch.strength != 0:
                by_target.setdefault(patch.target, []).append(patch)

    def merge(key: str, weight: torch.Tensor) -> torch.Tensor | None:
        patches = by_target.get(canonical(key))
        if not patches:
            return None
        merged = weight.to(torch.float32, copy=True)
        for patch in patches:
            merged.add_(patch.delta(tuple(weight.shape), weight.device), alpha=patch.strength)
        return merged

    merge.targets = frozenset(by_target)
    return merge


def refuse_gguf_lora(path: str) -> None:
    from .gguf import is_gguf
    if is_gguf(path):
        raise LoraError(f"'{path}' is a GGUF LoRA; wantalk reads LoRAs as safetensors. Use the LoRA's .safetensors "
                        f"release (GGUF LoRAs are not published for Wan 2.1; a GGUF model takes safetensors LoRAs, "
                        f"merged while it loads).")


def check_lora_file(path: str) -> None:
    """Fail early (header only) when a file picked as a LoRA holds no LoRA keys."""
    refuse_gguf_lora(path)
    keys = CheckpointReader(path).keys()
    if not any(_split_key(k) for k in keys):
        raise LoraError(f"'{path}' holds no LoRA keys (lora_A/B, lora_down/up, diff; first keys: "
                        f"{', '.join(keys[:4])}); choose a LoRA file from models/loras.")


# ----------------------------------------------------------------------------------------------
# Unmerged (run-time) LoRA
# ----------------------------------------------------------------------------------------------

class LoraLinear(nn.Module):
    """A linear layer plus run-time LoRA terms `strength * scale * up(down(x))` (or a full `delta(x)`).

    It holds the same `weight`/`bias` parameters under the same names, so state-dict keys do not change; the
    factors are non-persistent buffers, so they move with the module (block swap). It casts its input as the
    layer it wraps does (wanvideo/modules/cast_ops.py), LoRA terms included: a float32 layer stays float32."""

    def __init__(self, linear: nn.Linear, strengths: list[float]):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.base_type = getattr(linear, "base_type", type(linear))  # what `plain()` rebuilds
        self.casts = issubclass(self.base_type, CastLinear)
        self.fixed_dtype = self.base_type.fixed_dtype if self.casts else None
        self.weight, self.bias = linear.weight, linear.bias
        self.strengths = strengths  # shared with the owning UnmergedLoras: strengths change without reloading
        self.terms: list[tuple[int, str, str | None, float]] = []

    def add(self, patch: Patch) -> None:
        w, n = self.weight, len(self.terms)
        if patch.full is not None:
            self.register_buffer(f"lora_delta_{n}", patch.delta(tuple(w.shape), w.device).to(w.dtype), persistent=False)
            self.terms.append((patch.index, f"lora_delta_{n}", None, 1.0))
            return
        up, down = patch.factors(w.device, w.dtype)
        self.register_buffer(f"lora_down_{n}", down.contiguous(), persistent=False)
        self.register_buffer(f"lora_up_{n}", up.contiguous(), persistent=False)
        self.terms.append((patch.index, f"lora_down_{n}", f"lora_up_{n}", patch.scale))

    def plain(self) -> nn.Linear:
        """An nn.Linear over the current parameters (which block swap may have re-pointed)."""
        linear = self.base_type(self.in_features, self.out_features, self.bias is not None, device="meta")
        linear.weight, linear.bias = self.weight, self.bias
        return linear

    compute_dtype = CastLinear.compute_dtype  # the wrapped layer's rule (read at call time: block swap re-points)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.casts:
            x = x.to(self.compute_dtype)
        dtype = x.dtype
        y = F.linear(x, self.weight.to(dtype), None if self.bias is None else self.bias.to(dtype))
        for index, first, second, scale in self.terms:
            s = self.strengths[index] * scale
            if s == 0:
                continue
            h = F.linear(x, getattr(self, first).to(x.device, dtype, non_blocking=True))
            if second is not None:
                h = F.linear(h * s, getattr(self, second).to(x.device, dtype, non_blocking=True))
                y = y.add_(h)
            else:
                y = y.add_(h, alpha=s)
        return y


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


class UnmergedLoras:
    """LoRAs applied at run time, installed in one place: each targeted Linear becomes a `LoraLinear`; other
    targeted parameters (norms, biases, modulation, the patch conv) are recomputed from a kept base value when
    a strength changes. No reload is needed to change strengths; `remove()` restores the model."""

    def __init__(self, model: nn.Module, files: list[LoraFile]):
        self.model = model
        self.strengths = [f.strength for f in files]
        self._linears: dict[str, LoraLinear] = {}
        self._params: dict[str, tuple[torch.Tensor, list]] = {}  # target -> (base value, [(index, delta)])
        for patch in (p for f in files for p in f.patches):
            module_name, _, leaf = patch.target.rpartition(".")
            module = model.get_submodule(module_name) if module_name else model
            if isinstance(module, (nn.Linear, LoraLinear)) and leaf == "weight":
                if module_name not in self._linears:
                    self._linears[module_name] = LoraLinear(module, self.strengths)
                    _set_submodule(model, module_name, self._linears[module_name])
                self._linears[module_name].add(patch)
            else:
                if patch.target not in self._params:
                    self._params[patch.target] = (getattr(module, leaf).detach().clone(), [])
                base, deltas = self._params[patch.target]
                deltas.append((patch.index, patch.delta(tuple(base.shape), base.device)))
        self._refresh_params()

    def _refresh_params(self) -> None:
        """Write base + sum(strength * delta) into each live parameter (looked up by name: block swap and the
        LoraLinear swap re-point parameters)."""
        for target, (base, deltas) in self._params.items():
            value = base.float()
            for index, delta in deltas:
                value = value + self.strengths[index] * delta
            module_name, _, leaf = target.rpartition(".")
            owner = self.model.get_submodule(module_name) if module_name else self.model
            getattr(owner, leaf).data.copy_(value.to(base.dtype))

    def set_strength(self, index: int, strength: float) -> None:
        """Change the strength of LoRA `index` of the chain (takes effect on the next forward).

        Low-rank terms are read at every forward; full deltas (norms, biases, modulation) are written into the
        parameters, which block swap keeps copies of, so those cannot change once block swap is set up."""
        if self.model.block_runner is not None and any(i == index for _, d in self._params.values() for i, _ in d):
            raise LoraError("this LoRA also changes norms/biases/modulation, whose values block swap has already "
                            "copied; set its strength before block swap is configured (reload the model), or "
                            "use lora_mode 'merge'.")
        self.strengths[index] = float(strength)
        self._refresh_params()

    def remove(self) -> None:
        """Put the plain layers back and restore the base parameters."""
        for name, layer in self._linears.items():
            _set_submodule(self.model, name, layer.plain())
        self.strengths[:] = [0.0] * len(self.strengths)
        self._refresh_params()
        self._linears, self._params = {}, {}


def attach_unmerged_loras(model: nn.Module, loras) -> UnmergedLoras:
    """Apply `(path, strength)` LoRAs at run time to a non-quantized model; replaces earlier ones.
    The handle is also `model.unmerged_loras`."""
    report = getattr(model, "quant_report", None)
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    if (report is not None and report.mode != "disabled") or quantized:
        mode = report.mode if report is not None else "disabled"
        raise LoraModeError(f"unmerged LoRAs need a model that is not quantized, but this one uses quantization "
                            f"'{mode}' ({len(quantized)} fp8/fp4 linear layers, e.g. "
                            f"'{quantized[0] if quantized else '-'}'). Use lora_mode 'merge': the LoRA is merged "
                            f"into the weights before quantization and costs nothing at run time.")
    previous = getattr(model, "unmerged_loras", None)
    if previous is not None:
        previous.remove()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    model.unmerged_loras = UnmergedLoras(model, read_loras(loras, shapes))
    return model.unmerged_loras
