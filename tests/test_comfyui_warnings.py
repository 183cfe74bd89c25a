"""The pack's warnings reach a ComfyUI user: a real server runs HuMo Embeds on silent audio and a 7x7 reference image
(tiny Whisper), and the real frontend in headless Chromium shows the warning as a toast (web/wantalk_warnings.js).
Needs COMFYUI_DIR (and Chromium); skipped otherwise, like tests/test_comfyui.py."""
import os
import wave

import pytest

from comfy_frontend import Browser, Frontend, find_chromium
from comfy_server import ComfyServer, comfyui_dir
from tiny_humo import TINY_HUMO_FILES, make_tiny_humo_models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOASTS = "[...document.querySelectorAll('.p-toast-message')].map(t => t.innerText).join(' | ')"

pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(not comfyui_dir(), reason="COMFYUI_DIR not set: real-ComfyUI tests skipped"),
]


def silent_wav(path: str, seconds: float = 1.0, rate: int = 16000) -> None:
    with wave.open(path, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(b"\0\0" * int(seconds * rate))


def test_warnings_show_as_toasts(tmp_path):
    chromium = find_chromium()
    if not chromium:
        pytest.skip("Chromium not found (apt-get install -y chromium, or set CHROMIUM)")
    base = tmp_path / "comfy-base"
    make_tiny_humo_models(str(base / "models"))
    (base / "input").mkdir(parents=True)
    silent_wav(str(base / "input" / "silence.wav"))
    graph = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 7, "height": 7, "batch_size": 1, "color": 0}},
        "2": {"class_type": "LoadAudio", "inputs": {"audio": "silence.wav"}},
        "3": {"class_type": "WanTalkWhisperLoader", "inputs": {"model": TINY_HUMO_FILES["audio_encoders"],
                                                               "precision": "fp32", "device": "cpu"}},
        "4": {"class_type": "WanTalkHuMoEmbeds", "inputs": {"audio": ["2", 0], "num_frames": 0, "whisper": ["3", 0],
                                                            "reference_images": ["1", 0]}},
        "5": {"class_type": "PreviewAudio", "inputs": {"audio": ["4", 1]}},
    }
    with ComfyServer(comfyui_dir(), ROOT, base_dir=str(base)) as server, Browser(chromium) as browser:
        Frontend(browser, server.url)
        assert browser.evaluate("app.extensions.some(e => e.name === 'wantalk.warnings')")
        client = browser.evaluate("(window.comfyAPI?.api?.api ?? app.api).clientId")
        status, body = server.request("/prompt", {"prompt": graph, "client_id": client})
        assert status == 200, body
        shown = browser.wait_for(f"(() => {{ const t = {TOASTS}; return t.includes('is silent') && t; }})()", 120,
                                 "the silent-audio warning toast")
    assert "[wantalk HuMo Embeds] input 'audio' is silent" in shown
