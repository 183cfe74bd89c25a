"""The README's main job (run_demo.py) on an even smaller setting: the whole InfiniteTalk graph on tiny generated
weights gives one frame per 40 ms of the synthesised speech, and the mp4 carries both streams; its command line
refuses a speech too short for one frame and shows its defaults."""
import importlib

import pytest
import torch

run_demo = importlib.import_module("wantalk.run_demo")


@pytest.fixture(scope="module")
def demo_output(tmp_path_factory):
    work = tmp_path_factory.mktemp("demo")
    return run_demo.generate(str(work), seconds=0.9, height=32, width=48, steps=1, frame_window=9, motion_frames=5,
                             seed=3)


def test_demo_graph_covers_the_speech(demo_output):
    images, audio, fps = demo_output
    frames = int(0.9 * 25)
    assert images.shape == (frames, 32, 48, 3) and fps == 25.0
    assert 0 <= images.min() and images.max() <= 1 and images.std() > 0
    assert audio["sample_rate"] == 16000 and audio["waveform"].shape == (1, 1, frames * 640)
    assert audio["waveform"].abs().max() > 0.01


def test_demo_writes_an_mp4_with_sound(demo_output, tmp_path):
    av = pytest.importorskip("av", reason="PyAV (pip install av) is not installed: the mp4 part of the demo is "
                                          "skipped; the frames and audio were checked without it")
    images, audio, fps = demo_output
    path = run_demo.write_mp4(str(tmp_path / "demo.mp4"), images, audio, fps)
    with av.open(path) as container:
        kinds = {stream.type for stream in container.streams}
        decoded = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert kinds == {"video", "audio"}
    assert len(decoded) == images.shape[0] and decoded[0].shape == (32, 48, 3)
    # lossy, but the first frame must be recognisably the generated one
    first = torch.from_numpy(decoded[0]).float() / 255
    assert (first - images[0]).abs().mean() < 0.1


@pytest.mark.parametrize("seconds", ["0", "0.01", "-1", "nan"])
def test_demo_refuses_a_speech_shorter_than_one_frame(seconds, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_demo.main(["--seconds", seconds, "--out", "unused"])
    assert exit_info.value.code == 2
    assert "at least one frame" in capsys.readouterr().err


def test_demo_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        run_demo.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 3.5)" in text and "(default: output)" in text and "(default: 0)" in text
