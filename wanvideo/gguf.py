"""Reading GGUF diffusion-model files (city96/ComfyUI-GGUF layout) tensor by tensor.

Facts of the layout (city96's `tools/convert.py`, `tools/fix_5d_tensors.py` and llama.cpp quantize patch):
- `general.architecture` is `wan` for Wan 2.1 models; tensor names are the original state-dict keys, with a
  `model.diffusion_model.` prefix in some files;
- GGUF stores dims fastest-first: the torch shape is the reversed GGUF shape (`comfy.gguf.orig_shape.<name>`,
  when present, gives it directly);
- the 5-D `patch_embedding.weight` is appended as F32 after quantization (llama.cpp cannot hold 5-D tensors);
- 1-D tensors, tensors of <= 1024 values and `.modulation` stay F32; `patch_embedding`, `text_embedding`,
  `time_embedding`, `time_projection`, `img_emb` and `head` stay F16/BF16; the block linears are quantized,
  `_M` files keep the attention `v` and `ffn.2` layers at a higher type (Q6_K/Q5_K);
- the patch writes `blocks.N.modulation` as 3-D; files without it hold `(6, dim)`: shapes that differ only by
  leading ones are the same tensor.

`GGUFCheckpoint` offers the reader interface of `checkpoint.CheckpointReader` (keys, shape, get) over a
memory map of the file, so weights stream from disk as safetensors do; quantized weights come out as their
raw blocks (`uint8 [rows, row_bytes]`) with a `gguf_type` marker, never dequantized here.
"""
from __future__ import annotations

import math
import os
import warnings

import torch

from .checkpoint import CheckpointError
from .kernels.gguf_dequant import BLOCK_FORMATS, PLAIN_FORMATS

MAGIC = b"GGUF"
WAN_ARCHITECTURE = "wan"
TEXT_ENCODER_ARCHITECTURES = ("t5", "t5encoder", "llama", "qwen2vl", "qwen3", "qwen3vl")  # city96's text GGUFs
SUPPORTED_TYPES = tuple(PLAIN_FORMATS) + tuple(BLOCK_FORMATS)
TYPE_MARKER = "gguf_type"  # aux key carrying the block format of a quantized tensor


# Wan tensors city96's llama.cpp patch never quantizes (convert.py also keeps 1-D, <= 1024-value and modulation
# tensors in F32)
CITY96_UNQUANTIZED = ("modulation", "patch_embedding.", "text_embedding.", "time_projection.", "time_embedding.",
                      "img_emb.", "head.")


def city96_quantizes(key: str, shape: tuple[int, ...], qtype: str) -> bool:
    """Whether city96's tools store tensor `key` in the block type `qtype` (else F32/F16/BF16): 2-D, more than
    1024 values, not in `CITY96_UNQUANTIZED`, rows of whole blocks. For test files and bench stand-ins."""
    return (len(shape) == 2 and math.prod(shape) > 1024 and not any(k in key for k in CITY96_UNQUANTIZED)
            and shape[1] % BLOCK_FORMATS[qtype][0] == 0)


def is_gguf(path: str) -> bool:
    """True when the file starts with the GGUF magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def _gguf_package():
    try:
        import gguf
    except ImportError:
        raise CheckpointError("reading GGUF files needs the 'gguf' package (llama.cpp's reader): "
                              "pip install gguf") from None
    return gguf


def _string_field(reader, name: str) -> str | None:
    field = reader.get_field(name)
    if field is None or not field.data:
        return None
    try:
        return bytes(field.parts[field.data[-1]]).decode("utf-8")
    except (UnicodeDecodeError, TypeError):
        return None


def _int_array_field(reader, name: str) -> tuple[int, ...] | None:
    field = reader.get_field(name)
    if field is None:
        return None
    return tuple(int(field.parts[i][0]) for i in field.data)


def _open(gguf, path: str):
    size = os.path.getsize(path)
    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError) as exc:
        text = str(exc)
        if "GGMLQuantizationType" in text:
            raise CheckpointError(f"'{path}' holds a tensor type this version of the gguf reader does not know "
                                  f"({text}); wantalk reads {', '.join(SUPPORTED_TYPES)}.") from None
        raise CheckpointError(f"'{path}' ({size} bytes) is a damaged or truncated GGUF file ({type(exc).__name__}: "
                              f"{text[:160]}); download it again.") from None


class GGUFCheckpoint:
    """A Wan GGUF file: keys (prefix kept, as the loader strips it), torch shapes, tensors on demand."""

    def __init__(self, path: str):
        gguf = _gguf_package()
        self.path = path
        reader = _open(gguf, path)
        arch = _string_field(reader, "general.architecture")
        if arch is not None and arch != WAN_ARCHITECTURE:
            what = ("a text encoder: load it with ComfyUI-GGUF's CLIPLoader (GGUF), type 'wan'. "
                    if arch in TEXT_ENCODER_ARCHITECTURES else "")
            raise CheckpointError(f"'{path}' is a GGUF file of architecture '{arch}', not a Wan 2.1 diffusion model "
                                  f"('{WAN_ARCHITECTURE}'); it is {what or 'another model. '}Choose a Wan 2.1 GGUF "
                                  f"(e.g. city96's Wan2.1-I2V-14B-480P-gguf) or a Wan safetensors file.")
        self.metadata = {"gguf.architecture": arch or ""}
        size = os.path.getsize(path)
        self._tensors, self._shapes, self._types = {}, {}, {}
        unsupported = {}
        for t in reader.tensors:
            qtype = t.tensor_type.name
            if qtype not in SUPPORTED_TYPES:
                unsupported.setdefault(qtype, t.name)
            if t.data_offset + t.n_bytes > size:
                raise CheckpointError(f"'{path}' is truncated: tensor '{t.name}' ends at byte "
                                      f"{t.data_offset + t.n_bytes} but the file has {size}. Download it again.")
            shape = _int_array_field(reader, f"comfy.gguf.orig_shape.{t.name}") or \
                tuple(int(d) for d in reversed(t.shape.tolist()))
            if t.name.endswith("modulation") and len(shape) == 2:
                shape = (1, *shape)  # written without the quantize patch's 3-D fix
            self._tensors[t.name], self._shapes[t.name], self._types[t.name] = t, shape, qtype
        if unsupported:
            found = ", ".join(f"{q} (e.g. '{name}')" for q, name in unsupported.items())
            raise CheckpointError(f"'{path}' uses GGUF quant types wantalk does not read: {found}. Supported: "
                                  f"{', '.join(SUPPORTED_TYPES)}; choose a file in one of those (city96 publishes "
                                  f"Q3_K_S to Q8_0).")

    def keys(self) -> list[str]:
        return list(self._shapes)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def dtype_name(self, key: str) -> str:
        """The tensor's GGUF type name (`Q4_K`, `F16`, ...), as `CheckpointReader.dtype_name` names dtypes."""
        return self._types[key]

    def get(self, key: str) -> torch.Tensor:
        """Plain types: the tensor in its stored dtype and torch shape. Quantized types: raw blocks, one row of
        `uint8` per output row."""
        t, qtype, shape = self._tensors[key], self._types[key], self._shapes[key]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            raw = torch.from_numpy(t.data.reshape(-1).view("uint8")).clone()  # own memory, as safetensors gives
        if qtype in PLAIN_FORMATS:
            return raw.view(PLAIN_FORMATS[qtype]).reshape(shape)
        rows = shape[0] if len(shape) > 1 else 1
        return raw.reshape(rows, -1)

    def stored(self, key: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`get(key)` plus the aux marker the quantization policy reads (`gguf_type`, the type's index)."""
        tensor = self.get(key)
        qtype = self._types[key]
        aux = {} if qtype in PLAIN_FORMATS else {TYPE_MARKER: torch.tensor(SUPPORTED_TYPES.index(qtype))}
        return tensor, aux

    def nbytes(self) -> int:
        return os.path.getsize(self.path)


def marker_qtype(aux: dict[str, torch.Tensor]) -> str:
    """The block format named by a `gguf_type` aux marker."""
    return SUPPORTED_TYPES[int(aux[TYPE_MARKER])]
