"""HuMo at full size on the GPU (480x832, 97 frames + 1 reference frame = 26 x 1560 tokens, 40 heads of 128): the
per-frame audio attention (16 audio keys per frame) in bf16 through every attention mode stays close to float32
and small in memory. Needs a CUDA GPU: `python -m pytest tests/test_humo_gpu.py -q`."""
from types import SimpleNamespace

import pytest
import torch

from wantalk.humo.audio_attention import HumoBlockAdapter
from wantalk.humo.conditioning import HumoAudioConditioning
from wantalk.humo.model_addon import HumoConfig
from wantalk.wanvideo.modules.attention import use_attention_policy
from wantalk.wanvideo.modules.model import WAN_I2V_14B

pytestmark = pytest.mark.gpu

GRID = (26, 30, 52)
GIB = 2**30


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("mode", ["auto", "sdpa"])
def test_full_size_audio_block_bf16_memory_and_closeness(mode):
    gen = torch.Generator(device="cuda")
    gen.seed()
    cfg = WAN_I2V_14B.with_(image_branch=False, audio=HumoConfig())
    f, h, w = GRID
    adapter = HumoBlockAdapter(cfg, device="cuda", dtype=torch.float32)
    for name, p in adapter.named_parameters():
        p.data = (torch.randn(p.shape, device="cuda", generator=gen) / (p.shape[-1] ** 0.5 if p.dim() == 2 else 10)
                  + (1 if "norm" in name and name.endswith("weight") else 0))
    x = torch.randn(1, f * h * w, cfg.dim, device="cuda", generator=gen)
    tokens = torch.randn(1, f, 16, 1536, device="cuda", generator=gen)
    inp = SimpleNamespace(grid=GRID, audio=HumoAudioConditioning(tokens))
    with torch.no_grad():
        with use_attention_policy("sdpa"):
            ref = adapter.forward_in_block(adapter, x, inp)
        adapter.to(torch.bfloat16)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with use_attention_policy(mode):
            out = adapter.forward_in_block(adapter, x, inp)
        extra = (torch.cuda.max_memory_allocated() - base) / GIB
    assert out.isfinite().all()
    assert rel(out, ref) < 2e-2
    assert extra < 3.5, f"the audio block used {extra:.2f} GiB beyond its inputs"
