"""Tiny InfiniteTalk parts and random inputs shared by the long-video tests."""
import torch

from wantalk.multitalk.long_video import TalkAudio
from wantalk.wanvideo.sampling import Conditioning
from tiny_models import tiny_infinitetalk, tiny_vae


def tiny_talk_parts(seed: int):
    """(tiny Wan I2V + InfiniteTalk model, tiny VAE), random weights from `seed`."""
    g = torch.Generator().manual_seed(seed)
    model, _ = tiny_infinitetalk(g)
    vae, _ = tiny_vae(g)
    return model, vae


def talk_inputs(frames: int, rng, video_frames: int = 0, size: int = 32):
    """(image `[3, H, W]` or video `[F, 3, H, W]` in [-1, 1], one speaker's audio of `frames` frames, text with
    CLIP features) for the tiny model."""
    shape = (3, size, size) if video_frames == 0 else (video_frames, 3, size, size)
    frames_in = torch.rand(shape, generator=rng) * 2 - 1
    audio = TalkAudio([torch.randn(frames, 2, 16, generator=rng)])
    text = Conditioning(torch.randn(1, 5, 64, generator=rng), torch.randn(1, 3, 64, generator=rng),
                        torch.randn(1, 257, 32, generator=rng))
    return frames_in, audio, text


def stand_in_clip(rng):
    """A deterministic stand-in for CLIP vision: `[3, H, W]` -> `[1, 257, 32]` from the frame's channel means."""
    projection = torch.randn(3, 257 * 32, generator=rng)
    return lambda frame: (frame.mean((1, 2)) @ projection).reshape(1, 257, 32)
