"""wantalk demo: the InfiniteTalk graph on tiny generated weights, on the CPU, writing an mp4 with sound.

    python run_demo.py [--out output] [--seconds 3.5] [--seed 0]

It builds tiny random models with the real file layouts (Wan I2V DiT, InfiniteTalk add-on, VAE, wav2vec2) in a
temporary folder, draws a face, synthesises a speech-like clip, and runs the same nodes a ComfyUI graph runs:
Load Wan Model -> Load wav2vec2 -> Audio Embeds -> Load Wan VAE -> InfiniteTalk Sampler, with stand-in text and
CLIP embeddings (the real encoders are 11 GB). Random weights make abstract pictures, not a talking face: the demo
shows that the whole pipeline runs (windows, motion frames, colour match, audio at the video's length).
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import tempfile
import time

STARTED = time.perf_counter()  # before torch is imported: the wall time the demo prints includes the imports
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_SECONDS = 3.5
FPS = 25


def import_pack():
    """The repository as the package `wantalk` (it is a ComfyUI node folder, not an installed package), and the
    tiny model builders of tests/tiny_models.py."""
    if "wantalk" not in sys.modules:
        spec = importlib.util.spec_from_file_location("wantalk", os.path.join(ROOT, "__init__.py"),
                                                      submodule_search_locations=[ROOT])
        module = importlib.util.module_from_spec(spec)
        sys.modules["wantalk"] = module
        spec.loader.exec_module(module)
    tests = os.path.join(ROOT, "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import tiny_models
    return sys.modules["wantalk"], tiny_models


def generate(work_dir: str, *, seconds: float = DEFAULT_SECONDS, height: int = 64, width: int = 64,
             steps: int = 4, frame_window: int = 33, motion_frames: int = 5, seed: int = 0):
    """Run the InfiniteTalk graph on tiny weights; returns (IMAGE frames `[N, H, W, 3]`, AUDIO, fps)."""
    _, tiny = import_pack()
    from wantalk.nodes_audio import WanTalkAudioEmbeds, WanTalkAudioEncoderLoader
    from wantalk.nodes_infinitetalk import ClipVisionEmbeds, WanTalkInfiniteTalkSampler, WanTalkVAELoader
    from wantalk.nodes_model_loading import WanTalkModelLoader
    from wantalk.host import using_models_root
    from safetensors.torch import load_file

    models = os.path.join(work_dir, "models")
    tiny.write_tiny_infinitetalk_files(models, seed, vae_dim=4)
    names = tiny.TINY_FILES
    with using_models_root(models):
        model, _ = WanTalkModelLoader().load(names["diffusion_models"], "fp32", "disabled", "auto", "main_device",
                                             addon_model=names["model_patches"])
        vae, = WanTalkVAELoader().load(names["vae"], "fp32")
        encoder, = WanTalkAudioEncoderLoader().load(names["audio_encoders"], "fp32", "cpu")

    speech = {"waveform": tiny.synth_speech(seconds, seed=seed)[None, None], "sample_rate": 16000}
    embeds, _, _ = WanTalkAudioEmbeds().embed(speech, normalize_loudness=True, audio_scale=1.0, num_frames=0,
                                             two_speaker_mode="para", audio_encoder=encoder)
    stand_in = load_file(tiny.make_tiny_embeddings(os.path.join(work_dir, "embeddings.safetensors"), seed))
    portrait = tiny.procedural_portrait(height + height // 4, width)[None].permute(0, 2, 3, 1)
    return WanTalkInfiniteTalkSampler().sample(
        model=model, vae=vae, audio_embeds=embeds, positive=[[stand_in["positive"], {}]],
        negative=[[stand_in["negative"], {}]], start_image=portrait, width=width, height=height, steps=steps,
        shift=7.0, scheduler="infinitetalk_euler", text_scale=5.0, audio_scale=4.0, seed=seed,
        frame_window=frame_window, motion_frames=motion_frames, color_correction=1.0, max_frames=0,
        save_windows=False, clip_vision_output=ClipVisionEmbeds(stand_in["clip_vision"]))


def write_mp4(path: str, images: torch.Tensor, audio: dict, fps: float) -> str:
    """H.264 video + AAC audio with PyAV."""
    try:
        import av
    except ImportError:
        raise SystemExit("writing the mp4 needs PyAV: pip install av") from None
    from fractions import Fraction
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    frames = (images * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    waveform = audio["waveform"][0].float().numpy()            # [channels, samples]
    with av.open(path, mode="w") as container:
        video = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4",
                                     rate=Fraction(fps).limit_denominator(1000))
        video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        sound = container.add_stream("aac", rate=audio["sample_rate"])
        sound.layout = "mono" if waveform.shape[0] == 1 else "stereo"
        for frame in frames:
            container.mux(video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(video.encode())
        chunk = av.AudioFrame.from_ndarray(waveform.reshape(1, -1).copy() if waveform.shape[0] == 1
                                           else waveform.T.reshape(1, -1).copy(), format="flt",
                                           layout=sound.layout.name)
        chunk.sample_rate = audio["sample_rate"]
        container.mux(sound.encode(chunk))
        container.mux(sound.encode())
    return path


def seconds_of_speech(text: str) -> float:
    """--seconds: at least one video frame (1/25 s) of a finite length."""
    value = float(text)
    if not math.isfinite(value) or value < 1 / FPS:
        raise argparse.ArgumentTypeError(f"{text}: the speech must last at least one frame (1/{FPS:g} s = "
                                         f"{1 / FPS:g} s), e.g. --seconds 3.5")
    return value


def main(argv=None, started: float | None = None) -> str:
    started = time.perf_counter() if started is None else started
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="output", help="folder for wantalk_demo.mp4")
    parser.add_argument("--seconds", type=seconds_of_speech, default=DEFAULT_SECONDS,
                        help="length of the synthesised speech, hence of the video (25 fps)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the tiny weights, the speech and the noise")
    args = parser.parse_args(argv)
    # Tiny tensors: one thread is fastest. More threads spend the time synchronising (and spin while another
    # process holds the other core), which made the demo 5x slower on a busy 2-core machine.
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="wantalk-demo-") as work:
        images, audio, fps = generate(work, seconds=args.seconds, seed=args.seed)
    path = write_mp4(os.path.join(args.out, "wantalk_demo.mp4"), images, audio, fps)
    seconds = audio["waveform"].shape[-1] / audio["sample_rate"]
    print(f"wrote {path}: {images.shape[0]} frames {images.shape[2]}x{images.shape[1]} at {fps:g} fps, "
          f"{seconds:.2f} s of sound; wall time {time.perf_counter() - started:.1f} s")
    return path


if __name__ == "__main__":
    main(started=STARTED)
