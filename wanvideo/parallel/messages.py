"""What the sampler process and the multi-GPU workers send each other: bytes written by `torch.save` and read with
`torch.load(weights_only=True)`, so a message can hold tensors and plain containers but never makes the reader run
code. The conditioning dataclasses of the add-ons travel as `{"__dataclass__": name, field: value}` and are rebuilt
only from the allowlist below."""
from __future__ import annotations

import dataclasses
import io

import torch

_TAG = "__dataclass__"


def _allowed() -> dict:
    from ...humo.conditioning import HumoAudioConditioning
    from ...multitalk.conditioning import AudioConditioning
    return {cls.__name__: cls for cls in (AudioConditioning, HumoAudioConditioning)}


def _plain(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        name = type(obj).__name__
        if name not in _allowed():
            raise TypeError(f"the multi-GPU workers cannot receive a {name}; only {sorted(_allowed())} are supported")
        fields = {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                  if f.init and not f.name.startswith("_")}
        return {_TAG: name, **fields}
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    return obj


def _rebuilt(obj):
    if isinstance(obj, dict):
        if _TAG in obj:
            fields = {k: _rebuilt(v) for k, v in obj.items() if k != _TAG}
            return _allowed()[obj[_TAG]](**fields)
        return {k: _rebuilt(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_rebuilt(v) for v in obj)
    return obj


def encode(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(_plain(obj), buffer)
    return buffer.getvalue()


def decode(data: bytes):
    return _rebuilt(torch.load(io.BytesIO(data), weights_only=True))
