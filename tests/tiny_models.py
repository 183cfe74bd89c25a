"""Tiny models with the real key names, for tests and for placing in ComfyUI's model folders."""
from __future__ import annotations

import os

import torch
from safetensors.torch import load_file, save_file

from wantalk.wanvideo.modules.model import WanConfig, WanModel

TINY_I2V = WanConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, in_dim=36, text_dim=64, clip_dim=32)
TINY_T2V = TINY_I2V.with_(in_dim=16, image_branch=False)


def random_state_dict(model: torch.nn.Module, generator: torch.Generator | None = None, scale: float = 1.0) -> dict:
    """Random weights of a realistic scale: fan-in scaled linears, norms near 1."""
    sd = {}
    for name, p in model.state_dict().items():
        if p.dim() >= 2:
            fan_in = p[0].numel()
            sd[name] = torch.randn(p.shape, generator=generator) * (scale / fan_in ** 0.5)
        elif "norm" in name and name.endswith("weight"):
            sd[name] = 1 + 0.1 * torch.randn(p.shape, generator=generator)
        else:
            sd[name] = 0.1 * torch.randn(p.shape, generator=generator)
    return sd


def tiny_wan(cfg: WanConfig = TINY_I2V, generator=None, dtype=torch.float32, **kwargs) -> tuple[WanModel, dict]:
    model = WanModel(cfg, device="cpu", dtype=dtype, **kwargs)
    sd = random_state_dict(model, generator)
    model.load_state_dict(sd)
    return model.eval().requires_grad_(False), sd


def save_state_dict(sd: dict, path: str, prefix: str = "", dtype=None) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_file({prefix + k: (v.to(dtype) if dtype is not None else v).contiguous() for k, v in sd.items()}, path)
    return path


# ---- InfiniteTalk, VAE ------------------------------------------------------------------------------------

def tiny_infinitetalk_config():
    from wantalk.multitalk.model_addon import InfiniteTalkConfig
    return InfiniteTalkConfig(audio_layers=2, audio_channels=16, intermediate_dim=32, output_dim=32, context_tokens=4)


def tiny_addon_model(cfg: WanConfig, addon, generator=None, dtype=torch.float32) -> tuple[WanModel, dict]:
    """A tiny Wan model with an add-on (InfiniteTalk, HuMo) and random weights, with the real key names."""
    from wantalk.wanvideo.loader import build_model
    model = build_model(cfg.with_(audio=addon.config), addon, device="cpu", dtype=dtype)
    sd = random_state_dict(model, generator)
    model.load_state_dict(sd)
    return model.eval().requires_grad_(False), sd


def tiny_infinitetalk(generator=None, dtype=torch.float32, config=None) -> tuple[WanModel, dict]:
    """Tiny Wan I2V + InfiniteTalk (audio features: 2 layers x 16 channels unless `config` says otherwise)."""
    from wantalk.multitalk.model_addon import infinitetalk_addon
    return tiny_addon_model(TINY_I2V, infinitetalk_addon(config or tiny_infinitetalk_config()), generator, dtype)


def tiny_vae(generator=None, dim: int = 8):
    from wantalk.wanvideo.vae import WanVAE, WanVAEConfig
    vae = WanVAE(WanVAEConfig(dim=dim))
    sd = random_state_dict(vae, generator)
    vae.load_state_dict(sd)
    return vae.eval().requires_grad_(False), sd


# ---- the whole InfiniteTalk graph: model files for ComfyUI's folders, inputs, stand-in embeddings ----------
# The wav2vec2 loader infers heads as hidden // 64, so the smallest loadable encoder has 64 channels, and the
# add-on detector reads 12 layers from the audio projection's input width (1 if that does not divide): the tiny
# InfiniteTalk of these files therefore takes 12 layers x 64 channels of audio features, like the real 12 x 768.

def tiny_wav2vec2_config():
    from wantalk.multitalk.wav2vec2 import Wav2Vec2Config
    return Wav2Vec2Config(conv_dims=(16,) * 7, hidden_size=64, num_layers=12, num_heads=1, intermediate_size=96,
                          pos_conv_kernel=16, pos_conv_groups=4)   # real strides: 320 samples per frame


def tiny_graph_infinitetalk_config():
    from wantalk.multitalk.model_addon import InfiniteTalkConfig
    return InfiniteTalkConfig(audio_layers=12, audio_channels=64, intermediate_dim=32, output_dim=32, context_tokens=4)


def tiny_wav2vec2(generator=None) -> tuple[torch.nn.Module, dict]:
    from wantalk.multitalk.wav2vec2 import Wav2Vec2Encoder
    model = Wav2Vec2Encoder(tiny_wav2vec2_config(), device="cpu", dtype=torch.float32)
    sd = random_state_dict(model, generator)
    sd = {k: (v.abs() + 0.5 if k.endswith("weight_g") else v) for k, v in sd.items()}
    model.load_state_dict(sd)
    return model.eval().requires_grad_(False), sd


TINY_FILES = {"diffusion_models": "tiny_wan2.1_i2v.safetensors",
              "model_patches": "tiny_infinitetalk.safetensors",
              "vae": "tiny_wan_2.1_vae.safetensors",
              "audio_encoders": "tiny_chinese-wav2vec2-base.safetensors",
              "loras": "tiny_lightx2v_i2v_step_distill_rank4.safetensors"}
TINY_HUMO_FILES = {"diffusion_models": "tiny_humo_17b.safetensors",
                   "audio_encoders": "tiny_whisper_large_v3.safetensors"}   # written by tiny_humo.py
ADDON_KEY_MARKERS = ("audio_proj.", "audio_cross_attn.", "norm_x.")


# The files the example workflows name, and the tiny file that stands in for each.
REAL_TO_TINY = {"wan2.1_i2v_480p_14B_bf16.safetensors": TINY_FILES["diffusion_models"],
                "wan2.1_infiniteTalk_single_fp16.safetensors": TINY_FILES["model_patches"],
                "wan2.1_infiniteTalk_multi_fp16.safetensors": TINY_FILES["model_patches"],
                "wan_2.1_vae.safetensors": TINY_FILES["vae"],
                "wav2vec2-chinese-base_fp16.safetensors": TINY_FILES["audio_encoders"],
                "lightx2v_I2V_14B_480p_cfg_step_distill_rank64_bf16.safetensors": TINY_FILES["loras"],
                "humo_17B_fp16.safetensors": TINY_HUMO_FILES["diffusion_models"],
                "whisper_large_v3_fp16.safetensors": TINY_HUMO_FILES["audio_encoders"]}


def make_tiny_models(models_dir: str, seed: int = 0) -> dict:
    """Write the tiny files every example workflow needs into ComfyUI's model folders: Wan I2V, InfiniteTalk
    add-on, VAE, wav2vec2 and a step-distill-style LoRA (real key names, the layouts of the published files: bf16
    DiT, separate add-on, `wav2vec2.`-prefixed encoder), plus the tiny HuMo and Whisper files (tests/tiny_humo.py).
    Returns REAL_TO_TINY: the real file names of the workflows -> the tiny stand-ins."""
    from tiny_humo import make_tiny_humo_models
    files = write_tiny_infinitetalk_files(models_dir, seed)
    make_tiny_lora(os.path.join(models_dir, "loras", TINY_FILES["loras"]), load_file(files["diffusion_models"]),
                   torch.Generator().manual_seed(seed))
    make_tiny_humo_models(models_dir, seed)
    return dict(REAL_TO_TINY)


def write_tiny_infinitetalk_files(models_dir: str, seed: int = 0, vae_dim: int = 8) -> dict:
    """The tiny InfiniteTalk model files (no LoRA); returns {folder: path}. vae_dim: base width of the VAE (its
    full-resolution layers dominate the run time of a tiny graph; 4 is the narrowest that loads)."""
    g = torch.Generator().manual_seed(seed)
    _, sd = tiny_infinitetalk(g, config=tiny_graph_infinitetalk_config())
    addon = {k: v for k, v in sd.items() if any(m in k for m in ADDON_KEY_MARKERS)}
    base = {k: v for k, v in sd.items() if k not in addon}
    path = lambda kind: os.path.join(models_dir, kind, TINY_FILES[kind])
    save_state_dict(base, path("diffusion_models"), dtype=torch.bfloat16)
    save_state_dict(addon, path("model_patches"), dtype=torch.float16)
    save_state_dict(tiny_vae(g, dim=vae_dim)[1], path("vae"))
    save_state_dict(tiny_wav2vec2(g)[1], path("audio_encoders"), prefix="wav2vec2.")
    return {kind: path(kind) for kind in TINY_FILES if kind != "loras"}


# Layers of each block that the lightx2v step-distill LoRAs change with low-rank factors (and bias deltas), and
# the norms they change with full deltas.
LORA_LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                "cross_attn.v", "cross_attn.o", "cross_attn.k_img", "cross_attn.v_img", "ffn.0", "ffn.2")
LORA_NORMS = ("norm3", "self_attn.norm_q", "self_attn.norm_k", "cross_attn.norm_q", "cross_attn.norm_k",
              "cross_attn.norm_k_img")


def make_tiny_lora(path: str, base: dict, generator=None, rank: int = 4, scale: float = 0.05) -> str:
    """A LoRA in the layout of the lightx2v I2V step-distill files for the model with state dict `base`:
    `diffusion_model.blocks.N.<layer>.lora_down/lora_up.weight` + `.alpha` and `.diff_b` for the linears of every
    block and `head.head`, `.diff` for the norms; bf16. Small deltas: the model stays a sane tiny model."""
    tensors = {}
    blocks = sorted({int(k.split(".")[1]) for k in base if k.startswith("blocks.")})
    modules = [f"blocks.{n}.{layer}" for n in blocks for layer in LORA_LINEARS] + ["head.head"]
    for module in modules:
        out_dim, in_dim = base[f"{module}.weight"].shape
        key = f"diffusion_model.{module}"
        tensors[f"{key}.lora_down.weight"] = torch.randn(rank, in_dim, generator=generator) / in_dim ** 0.5
        tensors[f"{key}.lora_up.weight"] = scale * torch.randn(out_dim, rank, generator=generator) / rank ** 0.5
        tensors[f"{key}.alpha"] = torch.tensor(float(rank))
        tensors[f"{key}.diff_b"] = scale * torch.randn(out_dim, generator=generator)
    for module in (f"blocks.{n}.{norm}" for n in blocks for norm in LORA_NORMS):
        tensors[f"diffusion_model.{module}.diff"] = scale * torch.randn(base[f"{module}.weight"].shape,
                                                                        generator=generator)
    return save_state_dict(tensors, path, dtype=torch.bfloat16)


def make_tiny_embeddings(path: str, seed: int = 0, text_tokens: int = 12) -> str:
    """Stand-in text / CLIP vision embeddings at the tiny model's sizes (text 64, CLIP 32 channels), in the
    file layout of Save Embeddings (wantalk)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {"positive": torch.randn(1, text_tokens, TINY_I2V.text_dim, generator=g),
               "negative": torch.randn(1, text_tokens, TINY_I2V.text_dim, generator=g),
               "clip_vision": torch.randn(1, 257, TINY_I2V.clip_dim, generator=g)}
    return save_state_dict(tensors, path)


def procedural_portrait(height: int = 256, width: int = 256) -> torch.Tensor:
    """A drawn face `[3, H, W]` in [0, 1]: backdrop gradient, hair, skin ellipse, eyes, mouth."""
    y = torch.linspace(-1, 1, height)[:, None].expand(height, width)
    x = torch.linspace(-1, 1, width)[None, :].expand(height, width)
    image = torch.stack([0.25 + 0.2 * (y + 1) / 2, 0.35 + 0.1 * x, 0.55 - 0.15 * (y + 1) / 2])
    def paint(mask, rgb):
        image[:, mask] = torch.tensor(rgb)[:, None]
    paint((x / 0.52) ** 2 + ((y + 0.08) / 0.7) ** 2 < 1, (0.22, 0.14, 0.08))            # hair
    paint((x / 0.42) ** 2 + ((y - 0.05) / 0.58) ** 2 < 1, (0.93, 0.76, 0.62))           # face
    for cx in (-0.17, 0.17):
        paint(((x - cx) / 0.08) ** 2 + ((y + 0.1) / 0.05) ** 2 < 1, (1.0, 1.0, 1.0))    # eyes
        paint(((x - cx) / 0.035) ** 2 + ((y + 0.1) / 0.04) ** 2 < 1, (0.15, 0.25, 0.4))
    paint((x / 0.16) ** 2 + ((y - 0.32) / 0.05) ** 2 < 1, (0.7, 0.25, 0.3))             # mouth
    return image.clamp(0, 1)


def synth_speech(seconds: float = 3.5, sample_rate: int = 16000, seed: int = 0) -> torch.Tensor:
    """Speech-like mono audio `[T]`: glottal pulses at a wandering pitch, shaped by vowel formants, in
    syllables of ~200 ms separated by short pauses, plus a breath of noise."""
    g = torch.Generator().manual_seed(seed)
    n = int(seconds * sample_rate)
    t = torch.arange(n, dtype=torch.float64) / sample_rate
    pitch = 120 + 25 * torch.sin(2 * torch.pi * 0.7 * t) + 10 * torch.sin(2 * torch.pi * 3.1 * t)
    phase = torch.cumsum(pitch / sample_rate, 0)
    source = (phase % 1.0 < 0.08).double() + 0.02 * torch.randn(n, generator=g, dtype=torch.float64)
    vowels = torch.tensor([[730, 1090, 2440], [270, 2290, 3010], [570, 840, 2410], [300, 870, 2240]],
                          dtype=torch.float64)
    syllable = (t / 0.25).long()
    formants = vowels[torch.randint(0, len(vowels), (int(syllable[-1]) + 1,), generator=g)][syllable]
    speech = torch.zeros(n, dtype=torch.float64)
    size = n + 400
    source_spectrum = torch.fft.rfft(source, size)
    kernel_t = torch.arange(400, dtype=torch.float64) / sample_rate
    for k in range(3):                          # each formant: a decaying resonance driven by the pulses
        for f in formants[:, k].unique():
            ringing = torch.exp(-kernel_t * 60 * torch.pi) * torch.sin(2 * torch.pi * float(f) * kernel_t)
            part = torch.fft.irfft(source_spectrum * torch.fft.rfft(ringing, size), size)[:n]
            speech += torch.where(formants[:, k] == f, part, torch.zeros_like(part)) / (k + 1)
    envelope = torch.sin(torch.pi * ((t % 0.25) / 0.25).clamp(0, 0.8) / 0.8) ** 2
    speech = speech * envelope
    return (0.3 * speech / speech.abs().max()).float()


def write_wav(path: str, waveform: torch.Tensor, sample_rate: int = 16000) -> str:
    """16-bit PCM mono WAV with the standard library (no audio package needed)."""
    import wave
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    pcm = (waveform.clamp(-1, 1) * 32767).round().to(torch.int16).numpy().tobytes()
    with wave.open(path, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(pcm)
    return path


def write_png(path: str, image01: torch.Tensor) -> str:
    """RGB PNG `[3, H, W]` in [0, 1] with zlib (no image package needed)."""
    import struct
    import zlib
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    rgb = (image01.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()
    height, width = rgb.shape[:2]
    raw = b"".join(b"\x00" + rgb[row].numpy().tobytes() for row in range(height))
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def write_video(path: str, frames01: torch.Tensor, fps: int = 25) -> str:
    """An MPEG-4 video of `[F, 3, H, W]` frames in [0, 1] (even H and W), with PyAV (ComfyUI's video library)."""
    import av
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with av.open(path, "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.height, stream.width, stream.pix_fmt = frames01.shape[2], frames01.shape[3], "yuv420p"
        for frame in frames01:
            rgb = (frame.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode())
    return path


TINY_INPUTS = {"image": "wantalk_portrait.png", "audio_1": "wantalk_speech_1.wav", "audio_2": "wantalk_speech_2.wav",
               "video": "wantalk_talking.mp4"}


def make_tiny_inputs(input_dir: str, seconds: float = 1.2) -> dict:
    """The start image, the two speeches and the video to dub the example workflows load from ComfyUI's input
    folder."""
    portrait = procedural_portrait(96, 128)
    write_png(os.path.join(input_dir, TINY_INPUTS["image"]), portrait)
    write_wav(os.path.join(input_dir, TINY_INPUTS["audio_1"]), synth_speech(seconds, seed=1))
    write_wav(os.path.join(input_dir, TINY_INPUTS["audio_2"]), synth_speech(seconds, seed=2))
    write_video(os.path.join(input_dir, TINY_INPUTS["video"]),  # a video to dub: the portrait drifting sideways
                torch.stack([portrait.roll(2 * i, dims=2) for i in range(int(seconds * 25))]))
    return dict(TINY_INPUTS)
