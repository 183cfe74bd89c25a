"""InfiniteTalk at full size on the GPU (480x832, 81 frames = 21 x 1560 tokens, 40 heads of 128): the two-speaker
reference attention map stays small in memory and matches an explicit float32 map; the whole two-speaker
audio block in bf16 stays close to float32. Needs a CUDA GPU: `python -m pytest tests/test_infinitetalk_gpu.py -q`."""
import pytest
import torch
from types import SimpleNamespace

from wantalk.multitalk.audio_attention import InfiniteTalkBlockAdapter, reference_attention_map
from wantalk.multitalk.conditioning import AudioConditioning, speaker_masks
from wantalk.multitalk.model_addon import InfiniteTalkConfig
from wantalk.wanvideo.modules.model import WAN_I2V_14B

pytestmark = pytest.mark.gpu

GRID = (21, 30, 52)
HEADS, HEAD_DIM = 40, 128
GIB = 2**30


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def random_qk(gen, length):
    # Unit-RMS rows, like the RMS-normed self-attention q/k; scaled so the softmax is far from uniform.
    return [torch.randn(1, length, HEADS, HEAD_DIM, device="cuda", generator=gen) * 2 for _ in range(2)]


def test_full_size_reference_map_memory_and_values():
    gen = torch.Generator(device="cuda")
    gen.seed()
    f, h, w = GRID
    q, k = random_qk(gen, f * h * w)
    masks = speaker_masks(h, w).flatten(1).cuda()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    amap = reference_attention_map(q, k, h * w, masks, torch.bfloat16)
    extra = (torch.cuda.max_memory_allocated() - base) / GIB
    assert extra < 2.0, f"reference map used {extra:.2f} GiB beyond its inputs"  # the explicit map needs > 4 GiB
    rows = torch.randint(0, f * h * w, (1024,), device="cuda", generator=gen)
    attn = torch.softmax(torch.einsum("lnd,snd->nls", q[0, rows], k[0, :h * w]) / HEAD_DIM ** 0.5, dim=-1)
    ref = (torch.einsum("nls,cs->cl", attn, masks) / HEADS) / masks.sum(1)[:, None]
    assert rel(amap[0][:, rows], ref) < 2e-2


@pytest.mark.parametrize("speakers,tolerance", [(1, 2e-2), (2, 0.15)])
def test_full_size_audio_block_bf16_memory_and_closeness(speakers, tolerance):
    """bf16 vs float32 of the same weights. Two speakers get a loose bound: random q/k give near-tied class
    maps, whose argmax (and bf16-rounded positions, as in the official bf16 code) flips for some tokens."""
    gen = torch.Generator(device="cuda")
    gen.seed()
    cfg = WAN_I2V_14B.with_(audio=InfiniteTalkConfig())
    f, h, w = GRID
    adapter = InfiniteTalkBlockAdapter(cfg, device="cuda", dtype=torch.float32)
    for name, p in adapter.named_parameters():
        p.data = (torch.randn(p.shape, device="cuda", generator=gen) / (p.shape[-1] ** 0.5 if p.dim() == 2 else 10)
                  + (1 if "norm_x.weight" in name else 0))
    x = torch.randn(1, f * h * w, cfg.dim, device="cuda", generator=gen)
    tokens = torch.randn(1, f, 32 * speakers, 768, device="cuda", generator=gen)
    inp = SimpleNamespace(grid=GRID, audio=AudioConditioning(tokens, speakers, speaker_masks(480, 832)))
    keep_qk = random_qk(gen, f * h * w) if speakers == 2 else None
    with torch.no_grad():
        ref = adapter.forward_in_block(adapter, x, inp, keep_qk)
        adapter.to(torch.bfloat16)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = adapter.forward_in_block(adapter, x, inp, keep_qk)
        extra = (torch.cuda.max_memory_allocated() - base) / GIB
    assert out.isfinite().all()
    assert rel(out, ref) < tolerance
    assert extra < 4.0, f"the audio block used {extra:.2f} GiB beyond its inputs"
