"""The pack inside a real ComfyUI: registration, clean import, the example workflows run through /prompt on tiny
weights, each shipped API file is the real frontend's conversion of its UI file, and the template browser lists
exactly the UI workflows, each with its thumbnail, each opening with all its nodes.

Set COMFYUI_DIR to a ComfyUI source folder to run them (tests/comfy_server.py says which interpreter runs the
server); without it they skip. The frontend tests need Chromium (tests/comfy_frontend.py) and skip without it.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess

import pytest

import wantalk
import tiny_models
from comfy_frontend import Browser, Frontend, find_chromium
from comfy_server import PACK_NAME, ComfyServer, comfyui_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK_MODULE = f"custom_nodes.{PACK_NAME}"
WORKFLOW_DIR = os.path.join(ROOT, "example_workflows")
UI_NAMES = sorted(f[:-5] for f in os.listdir(WORKFLOW_DIR) if f.endswith(".json"))
API_DIR = os.path.join(WORKFLOW_DIR, "api")
API_NAMES = sorted(f[:-len("_api.json")] for f in os.listdir(API_DIR) if f.endswith("_api.json"))
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".mov")
PROMPT_TIMEOUT_S = 600

pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(not comfyui_dir(), reason="COMFYUI_DIR not set: real-ComfyUI tests skipped"),
]


def _read(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _api_file(name: str) -> str:
    return os.path.join(API_DIR, f"{name}_api.json")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One ComfyUI (CPU) with the pack as custom_nodes/wantalk in a fresh base directory; always stopped."""
    with ComfyServer(comfyui_dir(), ROOT, base_dir=str(tmp_path_factory.mktemp("comfy-base"))) as running:
        yield running


@pytest.fixture(scope="module")
def frontend(server):
    chromium = find_chromium()
    if not chromium:
        pytest.skip("Chromium not found (apt-get install -y chromium, or set CHROMIUM): frontend tests skipped")
    with Browser(chromium) as browser:
        yield Frontend(browser, server.url)


def test_every_node_is_registered_with_tooltips(server):
    expected = set(wantalk.NODE_CLASS_MAPPINGS)
    object_info = server.get("/object_info")
    registered = {name for name, info in object_info.items() if info.get("python_module") == PACK_MODULE}
    assert registered == expected, (
        f"nodes with python_module {PACK_MODULE}: missing {sorted(expected - registered)}, "
        f"unexpected {sorted(registered - expected)}\n{server.log()[-4000:]}")
    untipped = []
    for name in sorted(expected):
        inputs = object_info[name].get("input", {})
        for section in ("required", "optional"):
            for input_name, spec in inputs.get(section, {}).items():
                options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                if not str(options.get("tooltip", "")).strip():
                    untipped.append(f"{name}.{input_name}")
    assert not untipped, f"inputs without a tooltip: {untipped}"


def test_pack_imports_cleanly(server):
    log = server.log()
    pack_dir = server.pack_path()
    loaded = [line for line in log.splitlines() if line.rstrip().endswith(f"seconds: {pack_dir}")]
    failures = [line for line in log.splitlines()
                if ("IMPORT FAILED" in line or "Cannot import" in line) and PACK_NAME in line]
    pack_frames = [line for line in log.splitlines()
                   if line.lstrip().startswith("File ") and (pack_dir in line or ROOT + os.sep in line)]
    assert not failures, "ComfyUI failed to import the pack:\n" + "\n".join(failures) + "\n\n" + log[-6000:]
    assert not pack_frames, "traceback frames in the pack:\n" + "\n".join(pack_frames) + "\n\n" + log[-6000:]
    assert loaded, f"the pack is not listed as imported ({pack_dir}); server log tail:\n{log[-4000:]}"


# ComfyUI's CLIPLoader (type wan) and CLIPVisionLoader build fixed full-size umT5-XXL / ViT-H models, so no tiny
# file can stand in for them: on tiny weights their nodes are replaced by the pack's Load Embeddings node
# reading stand-in embeddings at the tiny model's sizes (outputs: positive, negative, clip_vision_output).
ENCODER_NODES = {"CLIPLoader", "CLIPTextEncode", "CLIPVisionLoader", "CLIPVisionEncode"}
# input linked to an encoder -> (input the stand-in feeds, its output slot); a CLIP vision model becomes its features
STAND_IN_SLOTS = {"positive": ("positive", 0), "negative": ("negative", 1),
                  "clip_vision_output": ("clip_vision_output", 2), "clip_vision": ("clip_vision_output", 2)}
STAND_IN_EMBEDDINGS = "wantalk_tiny.safetensors"
# Real-size settings that would take hours on a CPU with tiny weights (832x480, 40 steps) -> tiny ones.
TINY_SAMPLING = {"width": 64, "height": 48, "steps": 2, "frame_window": 17, "motion_frames": 5}
TINY_SETTINGS = {"WanTalkInfiniteTalkSampler": {**TINY_SAMPLING, "size": "custom"},
                 "WanTalkHuMoSampler": TINY_SAMPLING, "WanTalkVAELoader": {"precision": "fp32"}, "WanTalkWhisperLoader": {"precision": "fp32"}}
# Nodes that need a CUDA GPU: on a CPU server (start_comfy.sh's default --cpu) each is bypassed, its consumers
# getting the source of the named input instead (node type -> pass-through input).
CUDA_ONLY_NODES = {"WanTalkBlockSwap": "model"}


def _tiny_api_graph(api: dict, real_to_tiny: dict, cpu_server: bool) -> tuple[dict, list[str]]:
    """The workflow as it can run on tiny weights, and what was changed (printed by the test)."""
    api = json.loads(json.dumps(api))
    changes = []
    encoders = {k for k, node in api.items() if node["class_type"] in ENCODER_NODES}
    if encoders:
        stand_in = str(max(int(k) for k in api) + 1)
        api = {k: node for k, node in api.items() if k not in encoders}
        api[stand_in] = {"class_type": "WanTalkLoadEmbeddings", "inputs": {"embeddings": STAND_IN_EMBEDDINGS}}
        for node in api.values():
            for name, value in list(node["inputs"].items()):
                if isinstance(value, list) and value[0] in encoders:
                    target, slot = STAND_IN_SLOTS[name]
                    del node["inputs"][name]
                    node["inputs"][target] = [stand_in, slot]
        changes.append(f"text/CLIP-vision encoder nodes {sorted(encoders, key=int)} -> WanTalkLoadEmbeddings "
                       f"'{STAND_IN_EMBEDDINGS}' (ComfyUI's umT5-XXL / ViT-H loaders cannot load tiny files)")
    for key in [k for k, node in api.items() if cpu_server and node["class_type"] in CUDA_ONLY_NODES]:
        node = api.pop(key)
        source = node["inputs"][CUDA_ONLY_NODES[node["class_type"]]]
        for other in api.values():
            for name, value in other["inputs"].items():
                if isinstance(value, list) and value[0] == key:
                    other["inputs"][name] = source
        changes.append(f"{node['class_type']} node {key} bypassed (needs CUDA; the server runs on the CPU)")
    for key, node in api.items():
        for name, value in node["inputs"].items():
            if isinstance(value, str) and value in real_to_tiny:
                node["inputs"][name] = real_to_tiny[value]
                changes.append(f"{node['class_type']}.{name}: {value} -> {real_to_tiny[value]}")
        for name, value in TINY_SETTINGS.get(node["class_type"], {}).items():
            if node["inputs"].get(name) != value:
                changes.append(f"{node['class_type']}.{name}: {node['inputs'].get(name)} -> {value}")
                node["inputs"][name] = value
    return api, changes


@pytest.fixture(scope="module")
def tiny_files(server) -> dict:
    """Tiny models, inputs and stand-in embeddings in the server's folders (once); the real -> tiny file names."""
    real_to_tiny = tiny_models.make_tiny_models(os.path.join(server.base_dir, "models"))
    tiny_models.make_tiny_inputs(os.path.join(server.base_dir, "input"))
    tiny_models.make_tiny_embeddings(os.path.join(server.base_dir, "output", "wantalk_embeddings",
                                                  STAND_IN_EMBEDDINGS))
    return real_to_tiny


@pytest.mark.parametrize("name", API_NAMES)
def test_api_workflow_runs_on_tiny_weights_and_writes_a_video_with_sound(name, server, tiny_files):
    cpu_server = all(device.get("type") == "cpu" for device in server.get("/system_stats").get("devices", []))
    api, changes = _tiny_api_graph(_read(_api_file(name)), tiny_files, cpu_server)
    print(f"{name} on tiny weights, changed:\n  " + "\n  ".join(changes))
    entry = server.run_prompt(api, timeout=PROMPT_TIMEOUT_S)
    videos = [f for f in server.output_files(entry) if f.lower().endswith(VIDEO_EXTENSIONS)]
    assert videos and os.path.getsize(videos[0]) > 0, f"no video among the outputs: {entry.get('outputs')}"
    streams = subprocess.run([server.python, "-c", STREAM_KINDS, videos[0]], capture_output=True, text=True)
    assert streams.stdout.split() == ["audio", "video"], f"{videos[0]}: streams {streams.stdout} {streams.stderr}"


# Stream kinds of a video file, read with PyAV in the server's interpreter (ComfyUI's video nodes need it there).
STREAM_KINDS = "import av, sys; print(*sorted({s.type for s in av.open(sys.argv[1]).streams}))"


@pytest.mark.parametrize("name", UI_NAMES)
def test_api_file_is_the_frontends_conversion_of_the_ui_file(name, frontend):
    converted = frontend.to_api(_read(os.path.join(WORKFLOW_DIR, f"{name}.json")))
    shipped = _read(_api_file(name))
    differing = {key: {"frontend": converted.get(key), "shipped": shipped.get(key)}
                 for key in sorted(set(converted) | set(shipped), key=int) if converted.get(key) != shipped.get(key)}
    assert not differing, (f"api/{name}_api.json is not the frontend's conversion of {name}.json (run python "
                           f"example_workflows/build_workflows.py):\n{json.dumps(differing, indent=1)[:6000]}")


def _jpeg_size(path: str) -> tuple[int, int]:
    """(width, height) from a JPEG's start-of-frame segment."""
    with open(path, "rb") as f:
        data = f.read()
    i = 2
    while i < len(data):
        marker, length = data[i + 1], struct.unpack(">H", data[i + 2:i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            height, width = struct.unpack(">HH", data[i + 5:i + 9])
            return width, height
        i += 2 + length
    raise ValueError(f"{path}: no JPEG frame header")


def test_template_browser_lists_exactly_the_ui_workflows(server, frontend):
    """The server's listing and the browser's cards: the UI workflows, none of the API files."""
    assert sorted(server.get("/api/workflow_templates").get(PACK_NAME, [])) == UI_NAMES
    assert frontend.template_cards(PACK_NAME) == UI_NAMES


@pytest.mark.parametrize("name", UI_NAMES)
def test_template_card_shows_its_thumbnail_and_opens_with_all_nodes(name, frontend):
    ui = _read(os.path.join(WORKFLOW_DIR, f"{name}.json"))
    thumbnail = frontend.template_thumbnail_size(PACK_NAME, name)
    assert thumbnail == _jpeg_size(os.path.join(WORKFLOW_DIR, f"{name}.jpg")), (
        f"the card of {name} does not show {name}.jpg (image size {thumbnail})")
    assert frontend.open_template(PACK_NAME, name) == sorted(node["type"] for node in ui["nodes"])
