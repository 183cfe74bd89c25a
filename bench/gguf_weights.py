"""GGUF stand-ins of full-size weights for the benches: which tensors city96's tools quantize, and their blocks.

Q8_0 blocks are the real quantization of the given weights (`gguf_dequant.quantize_q8_0`, ggml's rounding);
other types get random codes and sub-scales of the weights' size (llama.cpp's K-quant search has no Python port).
Speed and memory depend only on the format, not on the code values.
"""
import torch

from _common import import_pack

def quantized_by_city96(key: str, shape: tuple, qtype: str) -> bool:
    import_pack()
    from wantalk.wanvideo.gguf import city96_quantizes
    return city96_quantizes(key, shape, qtype)


def blocks_for(weight: torch.Tensor, qtype: str, generator: torch.Generator) -> torch.Tensor:
    """`[N, K]` weight -> `uint8 [N, row_bytes]` blocks of `qtype` (see the module docstring)."""
    from wantalk.wanvideo.kernels import gguf_dequant as gd
    if qtype == "Q8_0":
        return gd.quantize_q8_0(weight)
    block, _ = gd.BLOCK_FORMATS[qtype]
    amp = 2 * weight.float().std().item()
    return gd.random_blocks(qtype, weight.numel() // block, amp, generator, weight.device).reshape(weight.shape[0], -1)


def gguf_source(shapes: dict, qtype: str, fetch, generator: torch.Generator):
    """Wrap a bench `fetch(key) -> (tensor, aux)` so the tensors city96 quantizes come as `qtype` GGUF blocks;
    returns the wrapped fetch and the stored formats for `assemble_model(stored=...)` (the layer plan)."""
    from wantalk.wanvideo.gguf import SUPPORTED_TYPES, TYPE_MARKER
    quantized = {k for k, shape in shapes.items() if quantized_by_city96(k, shape, qtype)}

    def wrapped(key):
        tensor, aux = fetch(key)
        if key not in quantized:
            return tensor, aux
        return blocks_for(tensor, qtype, generator), {TYPE_MARKER: torch.tensor(SUPPORTED_TYPES.index(qtype))}
    return wrapped, {k: qtype for k in quantized}
