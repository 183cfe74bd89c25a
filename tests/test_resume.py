"""Resume (issue 15, item 4) and host memory (item 8) on tiny weights: the run key covers every setting, the VAE's
weights and precision, unmerged LoRA strengths and any weight of any block; damaged window files are re-run with
a warning naming them; two processes share one windows folder; a run whose output cannot fit in RAM is refused
before sampling."""
import copy
import dataclasses
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from wantalk.multitalk.long_video import LongVideoSettings, generate_long_video
from wantalk.wanvideo import host_memory
from wantalk.wanvideo.lora import attach_unmerged_loras
from wantalk.wanvideo.resume import checksum, file_identity, run_key
from talk_inputs import talk_inputs, tiny_talk_parts

TESTS = os.path.dirname(os.path.abspath(__file__))
SETTINGS = LongVideoSettings(frame_window=9, motion_frames=5, steps=2, shift=7.0, text_scale=2.0, audio_scale=3.0,
                             seed=7, color_correction=0.5)


@pytest.fixture(scope="module")
def parts():
    return tiny_talk_parts(21)


_inputs = talk_inputs


def _run(model, vae, inputs, folder, settings=SETTINGS):
    """(video, windows that were sampled) of a resumable run."""
    sampled = set()
    video = generate_long_video(model, vae, *inputs, settings, resume_dir=str(folder),
                                on_step=lambda w, *_: sampled.add(w))
    return video, sampled


# ---------------------------------------------------------------------------------------------- the run key

def _other_value(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 4
    return value + "_other"


def test_run_key_changes_with_every_setting():
    keys = {run_key(SETTINGS)}
    for field in dataclasses.fields(LongVideoSettings):
        changed = dataclasses.replace(SETTINGS, **{field.name: _other_value(getattr(SETTINGS, field.name))})
        keys.add(run_key(changed))
    assert len(keys) == 1 + len(dataclasses.fields(LongVideoSettings))


def test_file_identity_sees_a_rewrite_and_a_changed_block(tmp_path):
    path = tmp_path / "model.safetensors"
    weights = torch.randn(4096, 64)
    save_file({"w": weights}, str(path))
    first = file_identity(str(path))
    assert file_identity(str(path)) == first
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1                        # a sampled block: same size, mtime restored
    stat = os.stat(path)
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert file_identity(str(path)) != first
    path.write_bytes(bytes(data))                    # rewritten: the mtime changes
    assert file_identity(str(path)) != first


def test_resume_recomputes_when_anything_that_determines_the_frames_changes(parts, rng, tmp_path):
    model, vae = parts
    inputs = _inputs(9, rng)                         # one window
    first, sampled = _run(model, vae, inputs, tmp_path)
    assert sampled == {0}
    again, sampled = _run(model, vae, inputs, tmp_path)
    assert sampled == set() and torch.equal(again, first)

    def recomputed(model=model, vae=vae, settings=SETTINGS):
        return _run(model, vae, inputs, tmp_path, settings)[1] == {0}

    # the VAE's weights (one value of the decoder) and its precision
    weight = vae.decoder.head[-1].weight if hasattr(vae.decoder, "head") else next(vae.decoder.parameters())
    with torch.no_grad():
        weight.view(-1)[7] += 1e-3
    try:
        assert recomputed()
    finally:
        with torch.no_grad():
            weight.view(-1)[7] -= 1e-3
    assert recomputed(vae=copy.deepcopy(vae).to(torch.bfloat16))
    # one weight of any block
    ffn_weights = [(n, p) for n, p in model.named_parameters()
                   if n.startswith("blocks.") and n.endswith("ffn.2.weight")]
    assert ffn_weights
    for name, param in ffn_weights:
        with torch.no_grad():
            param.view(-1)[-3] += 1e-4
        try:
            assert recomputed(), name
        finally:
            with torch.no_grad():
                param.view(-1)[-3] -= 1e-4
    # sampler settings, end to end
    for change in ({"steps": 3}, {"shift": 5.0}, {"seed": 8}, {"text_scale": 2.5}, {"audio_scale": 2.0},
                   {"color_correction": 0.0}, {"scheduler": "euler"}, {"continuation": "multitalk"},
                   {"audio_scale_embeds": 0.9}, {"vae_tile": 128}):
        assert recomputed(settings=dataclasses.replace(SETTINGS, **change)), change
    assert _run(model, vae, inputs, tmp_path)[1] == set()     # the original run still resumes


def test_unmerged_lora_strength_is_part_of_the_key(rng, tmp_path):
    model, vae = tiny_talk_parts(5)          # its own model: the LoRA replaces layers
    down, up = torch.randn(4, 256, generator=rng), torch.randn(256, 4, generator=rng) * 0.02
    lora = tmp_path / "lora.safetensors"
    save_file({"diffusion_model.blocks.1.self_attn.q.lora_down.weight": down,
               "diffusion_model.blocks.1.self_attn.q.lora_up.weight": up}, str(lora))
    loras = attach_unmerged_loras(model, [(str(lora), 1.0)])
    inputs = _inputs(9, rng)
    windows = tmp_path / "windows"
    at_one, sampled = _run(model, vae, inputs, windows)
    assert sampled == {0}
    loras.set_strength(0, 0.5)
    at_half, sampled = _run(model, vae, inputs, windows)
    assert sampled == {0} and not torch.equal(at_half, at_one)
    loras.set_strength(0, 1.0)
    assert _run(model, vae, inputs, windows)[1] == set()


# ---------------------------------------------------------------------------------------------- damaged windows

def _damage(path, how, rng):
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[:len(data) // 2])
    elif how == "zero bytes":
        path.write_bytes(b"")
    elif how == "garbage":
        path.write_bytes(bytes(torch.randint(0, 256, (len(data),), generator=rng, dtype=torch.uint8).tolist()))
    elif how == "flipped byte":
        damaged = bytearray(data)
        damaged[-5] ^= 0x40
        path.write_bytes(bytes(damaged))
    else:
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        frames = torch.zeros(3, 32, 32, 3, dtype=torch.uint8)
        meta = {**meta, "checksum": checksum(frames)}
        save_file({"frames" if how == "wrong shape" else "pixels": frames}, str(path), metadata=meta)


@pytest.mark.parametrize("how", ["truncated", "zero bytes", "garbage", "wrong shape", "missing key", "flipped byte"])
def test_a_damaged_window_is_computed_again_with_a_warning(parts, rng, tmp_path, caplog, how):
    model, vae = parts
    inputs = _inputs(13, rng)                        # windows at 0 and 4
    first, sampled = _run(model, vae, inputs, tmp_path)
    assert sampled == {0, 1}
    (folder,) = tmp_path.iterdir()
    damaged = folder / "window_0001.safetensors"
    _damage(damaged, how, rng)
    resumed, sampled = _run(model, vae, inputs, tmp_path)
    assert sampled == {1} and torch.equal(resumed, first)
    assert str(damaged) in caplog.text and "computing that window again" in caplog.text
    assert _run(model, vae, inputs, tmp_path)[1] == set()     # the rewritten file is good


# ---------------------------------------------------------------------------------------------- two processes

SCRIPT = textwrap.dedent("""
    import sys, json
    sys.path.insert(0, {tests!r})
    import conftest  # registers the package
    import torch
    from tiny_models import tiny_infinitetalk, tiny_vae
    from wantalk.multitalk.long_video import LongVideoSettings, TalkAudio, generate_long_video
    from wantalk.wanvideo.sampling import Conditioning
    model, _ = tiny_infinitetalk(torch.Generator().manual_seed(21))
    vae, _ = tiny_vae(torch.Generator().manual_seed(22))
    g = torch.Generator().manual_seed(23)
    image = torch.rand(3, 32, 32, generator=g) * 2 - 1
    audio = TalkAudio([torch.randn(13, 2, 16, generator=g)])
    text = Conditioning(torch.randn(1, 5, 64, generator=g), torch.randn(1, 3, 64, generator=g),
                        torch.randn(1, 257, 32, generator=g))
    settings = LongVideoSettings(frame_window=9, motion_frames=5, steps=2, seed=7)
    sampled = set()
    video = generate_long_video(model, vae, image, audio, text, settings, resume_dir=sys.argv[1],
                                on_step=lambda w, *_: sampled.add(w))
    torch.save(video, sys.argv[2])
    print(json.dumps(sorted(sampled)))
""")


def test_two_processes_share_one_windows_folder(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(tests=TESTS))
    folder = tmp_path / "windows"
    procs = [subprocess.Popen([sys.executable, str(script), str(folder), str(tmp_path / f"out{i}.pt")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err[-2000:]
    sampled = [set(eval(out.strip().splitlines()[-1])) for out, _ in results]
    assert sampled[0] | sampled[1] == {0, 1} and not sampled[0] & sampled[1]   # each window once
    videos = [torch.load(tmp_path / f"out{i}.pt", weights_only=True) for i in range(2)]
    assert videos[0].shape == (13, 32, 32, 3) and torch.equal(videos[0], videos[1])
    (run_folder,) = folder.iterdir()
    assert sorted(p.name for p in run_folder.iterdir() if not p.name.startswith(".")) == [
        f"window_{i:04d}.safetensors" for i in range(2)]                               # no temporary left


# ---------------------------------------------------------------------------------------------- host memory

def test_host_plan_refuses_with_what_fits():
    plan = host_memory.HostPlan(output_frames=1500, height=480, width=832, window_frames=81)
    assert plan.total > 1500 * 480 * 832 * 3 * 4
    with pytest.raises(host_memory.HostMemoryError, match=r"max_frames to at most \d+.*previous_frames"):
        host_memory.check_host_memory(plan, available=4 * 2**30)
    fits = int(str(pytest.raises(host_memory.HostMemoryError, host_memory.check_host_memory, plan,
                                 8 * 2**30).value).split("at most ")[1].split()[0])
    host_memory.check_host_memory(dataclasses.replace(plan, output_frames=fits), available=8 * 2**30)
    with pytest.raises(host_memory.HostMemoryError):
        host_memory.check_host_memory(dataclasses.replace(plan, output_frames=fits + 1), available=8 * 2**30)


def test_a_run_that_cannot_fit_in_ram_is_refused_before_sampling(parts, rng, monkeypatch):
    model, vae = parts
    monkeypatch.setattr(host_memory, "available_bytes", lambda: 10**6)
    steps = []
    with pytest.raises(host_memory.HostMemoryError, match="GiB of RAM"):
        generate_long_video(model, vae, *_inputs(13, rng), SETTINGS, on_step=lambda *a: steps.append(a))
    assert steps == []
