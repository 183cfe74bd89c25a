"""The official CLIP image input (straight bicubic resize to 224, CLIP mean/std, no crop, no rounding), checked
against an independent float64 implementation, and its use with ComfyUI's CLIP vision model."""
import numpy as np
import torch

from wantalk.multitalk.clip_input import CLIP_MEAN, CLIP_STD, encode_official, official_clip_pixels


def cubic_weights(out_size: int, in_size: int, a: float = -0.75) -> np.ndarray:
    """Resampling matrix [out, in] of Keys' cubic convolution (a = -0.75), half-pixel centres, edges repeated."""
    matrix = np.zeros((out_size, in_size))
    for o in range(out_size):
        centre = (o + 0.5) * in_size / out_size - 0.5
        base = int(np.floor(centre))
        for tap in range(base - 1, base + 3):
            d = abs(centre - tap)
            if d <= 1:
                w = (a + 2) * d ** 3 - (a + 3) * d ** 2 + 1
            elif d < 2:
                w = a * d ** 3 - 5 * a * d ** 2 + 8 * a * d - 4 * a
            else:
                w = 0.0
            matrix[o, min(max(tap, 0), in_size - 1)] += w
    return matrix


def reference_pixels(frame: torch.Tensor, size: int = 224) -> np.ndarray:
    x = frame.double().numpy()
    rows, cols = cubic_weights(size, x.shape[1]), cubic_weights(size, x.shape[2])
    resized = rows[None] @ x @ cols.T[None]
    mean, std = np.array(CLIP_MEAN)[:, None, None], np.array(CLIP_STD)[:, None, None]
    return resized / (2 * std) + (0.5 - mean) / std


def test_official_clip_pixels_match_an_independent_float64_transform(rng):
    for height, width in ((480, 832), (832, 480), (96, 80)):      # squashed, stretched, upscaled
        frame = torch.rand(3, height, width, generator=rng) * 2 - 1
        ours = official_clip_pixels(frame)
        assert ours.shape == (1, 3, 224, 224)
        reference = reference_pixels(frame)
        error = ours[0].double().numpy() - reference
        # torch places the taps in float32 (positions up to 832 off by ~1e-4 pixel); any other kernel, an
        # antialiased resize, a crop or 8-bit rounding is off by 1e-2 or more
        assert np.linalg.norm(error) / np.linalg.norm(reference) < 1e-4
        assert np.abs(error).max() < 2e-3


class FakeComfyClipVision:
    """ComfyUI's ClipVisionModel surface: image_size, patcher, load_device and model(pixel_values,
    intermediate_output) -> (last, penultimate, pooled, projected); encode_image preprocesses differently."""

    def __init__(self, rng, width: int = 8):
        self.image_size, self.patcher, self.load_device = 224, object(), torch.device("cpu")
        self.projection = torch.randn(3, 257 * width, generator=rng).requires_grad_()   # like nn.Parameters
        self.seen = []

        def model(pixel_values, intermediate_output):
            self.seen.append((pixel_values, intermediate_output))
            features = (pixel_values.mean((2, 3)) @ self.projection).reshape(-1, 257, width)
            return features + 1, features, None, None
        self.model = model

    def encode_image(self, image, crop=True):
        raise AssertionError("encode_image rounds and antialiases: the official path must not use it")


def test_encode_official_feeds_the_official_pixels_to_comfys_model(rng):
    clip = FakeComfyClipVision(rng)
    frame = torch.rand(3, 64, 48, generator=rng) * 2 - 1
    features = encode_official(clip, frame)
    (pixels, layer), = clip.seen
    assert layer == -2 and features.shape == (1, 257, 8) and not features.requires_grad   # no autograd graph
    torch.testing.assert_close(pixels, official_clip_pixels(frame))
    torch.testing.assert_close(features, (pixels.mean((2, 3)) @ clip.projection).reshape(1, 257, 8))


def test_a_clip_vision_without_comfys_model_gets_the_official_pixels_through_encode_image(rng):
    seen = []

    class EncodeImageOnly:
        def encode_image(self, image, crop=True):
            seen.append((image, crop))
            return {"penultimate_hidden_states": image.mean((1, 2))[:, None, :].expand(1, 257, 3)}
    frame = torch.rand(3, 40, 72, generator=rng) * 2 - 1
    features = encode_official(EncodeImageOnly(), frame)
    (image, crop), = seen
    assert crop is False and image.shape == (1, 224, 224, 3) and features.shape == (1, 257, 3)
    unit = official_clip_pixels(frame) * torch.tensor(CLIP_STD).view(1, 3, 1, 1) + torch.tensor(CLIP_MEAN).view(
        1, 3, 1, 1)
    torch.testing.assert_close(image, unit.permute(0, 2, 3, 1))
