"""The pack inside a real ComfyUI: registration, clean import, example workflows.

These tests need a ComfyUI source tree (COMFYUI_DIR) and its venv (COMFY_PYTHON); CI has neither,
so they skip there. They drive one headless server on 127.0.0.1 through the shared tools
(start_comfy.sh, stop_comfy.sh, run_prompt.py, ui_to_api.py); see docs/COMFYUI.md in the shared
folder for how to build the tree and venv.
"""
from __future__ import annotations

import glob
import importlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import urllib.request

import pytest

import wantalk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("WANTALK_SHARED", os.path.join(os.path.dirname(ROOT), "shared"))
TOOLS = os.path.join(SHARED, "tools")
PACK_NAME = "wantalk"  # the folder name users clone into custom_nodes/, hence the module name
PACK_MODULE = f"custom_nodes.{PACK_NAME}"
WORKFLOW_DIR = os.path.join(ROOT, "example_workflows")
API_WORKFLOWS = sorted(glob.glob(os.path.join(WORKFLOW_DIR, "api", "*_api.json")))
UI_WORKFLOWS = sorted(glob.glob(os.path.join(WORKFLOW_DIR, "*.json")))
NO_WORKFLOWS = "no example workflows yet"
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".mov", ".gif", ".webp")
# Frontend-only node types: they never reach the server, so /object_info does not list them.
FRONTEND_ONLY_TYPES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
PROMPT_TIMEOUT_S = 600

pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(not os.environ.get("COMFYUI_DIR"), reason="COMFYUI_DIR not set: real-ComfyUI tests skipped"),
]


def _tool(name: str) -> str:
    path = os.path.join(TOOLS, name)
    if not os.path.exists(path):
        pytest.skip(f"ComfyUI test tools not found at {TOOLS} (set WANTALK_SHARED)")
    return path


def _comfy_python() -> str:
    return os.environ.get("COMFY_PYTHON") or sys.executable


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


def _server_log(run_dir: str) -> str:
    """server.log without ANSI colour codes."""
    with open(os.path.join(run_dir, "server.log"), encoding="utf-8", errors="replace") as f:
        return re.sub(r"\x1b\[[0-9;]*m", "", f.read())


def _param_or_none(paths: list[str]):
    """One test per workflow file; a single placeholder (which skips) when there are none."""
    return pytest.mark.parametrize("workflow", paths or [None], ids=[os.path.basename(p) for p in paths] or ["none"])


@pytest.fixture(scope="module")
def comfy_server(tmp_path_factory):
    """One ComfyUI with the pack as custom_nodes/wantalk; yields (base URL, run dir); always stopped."""
    start, stop = _tool("start_comfy.sh"), _tool("stop_comfy.sh")
    run_dir = os.path.realpath(tmp_path_factory.mktemp("comfy-run"))
    port = _free_port()
    env = dict(os.environ, COMFY_PYTHON=_comfy_python(), PACK_NAME=PACK_NAME,
               COMFY_EXTRA_ARGS="--cache-none --disable-api-nodes")
    try:
        started = subprocess.run([start, ROOT, str(port), run_dir], env=env, capture_output=True, text=True)
        if started.returncode != 0:
            pytest.fail(f"ComfyUI did not start (exit {started.returncode}):\n{started.stderr[-4000:]}")
        yield f"http://127.0.0.1:{port}", run_dir
    finally:
        if os.path.exists(os.path.join(run_dir, "server.pid")):
            subprocess.run([stop, run_dir], capture_output=True, text=True)


def test_every_node_is_registered_with_tooltips(comfy_server):
    base_url, _ = comfy_server
    expected = set(wantalk.NODE_CLASS_MAPPINGS)
    if not expected:
        pytest.skip("the pack's NODE_CLASS_MAPPINGS is empty: no nodes to check yet")
    object_info = _get_json(f"{base_url}/object_info")
    registered = {name for name, info in object_info.items() if info.get("python_module") == PACK_MODULE}
    assert registered == expected, (
        f"nodes with python_module {PACK_MODULE}: missing {sorted(expected - registered)}, "
        f"unexpected {sorted(registered - expected)}")
    untipped = []
    for name in sorted(expected):
        inputs = object_info[name].get("input", {})
        for section in ("required", "optional"):
            for input_name, spec in inputs.get(section, {}).items():
                options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                if not str(options.get("tooltip", "")).strip():
                    untipped.append(f"{name}.{input_name}")
    assert not untipped, f"inputs without a tooltip: {untipped}"


def test_pack_imports_cleanly(comfy_server):
    _, run_dir = comfy_server
    log = _server_log(run_dir)
    pack_dir = os.path.join(run_dir, "custom_nodes", PACK_NAME)
    loaded = re.search(r"[\d.]+ seconds: " + re.escape(pack_dir) + r"\s*$", log, re.MULTILINE)
    failures = [line for line in log.splitlines()
                if ("IMPORT FAILED" in line or "Cannot import" in line) and PACK_NAME in line]
    pack_frames = [line for line in log.splitlines()
                   if line.lstrip().startswith("File ") and (pack_dir in line or ROOT + os.sep in line)]
    assert not failures, "ComfyUI failed to import the pack:\n" + "\n".join(failures) + "\n\n" + log[-6000:]
    assert not pack_frames, "traceback frames in the pack:\n" + "\n".join(pack_frames) + "\n\n" + log[-6000:]
    assert loaded, f"the pack is not listed as imported ({pack_dir}); server log tail:\n{log[-4000:]}"


def _tiny_model_maker():
    try:
        tiny_models = importlib.import_module("tiny_models")
    except ImportError as exc:
        pytest.skip(f"tests/tiny_models.py is not importable ({exc}): cannot place tiny models")
    if not hasattr(tiny_models, "make_tiny_models"):
        pytest.skip("tests/tiny_models.py has no make_tiny_models(models_dir) yet: cannot place tiny models")
    return tiny_models


# ComfyUI's CLIPLoader (type wan) and CLIPVisionLoader build fixed full-size umT5-XXL / ViT-H models, so no tiny
# file can stand in for them: on tiny weights their nodes are replaced by the pack's Load Embeddings node
# reading stand-in embeddings at the tiny model's sizes (outputs: positive, negative, clip_vision_output).
ENCODER_NODES = {"CLIPLoader", "CLIPTextEncode", "CLIPVisionLoader", "CLIPVisionEncode"}
STAND_IN_SLOTS = {"positive": 0, "negative": 1, "clip_vision_output": 2}
STAND_IN_EMBEDDINGS = "wantalk_tiny.safetensors"
# Real-size settings that would take hours on a CPU with tiny weights (832x480, 40 steps) -> tiny ones.
TINY_SETTINGS = {"WanTalkInfiniteTalkSampler": {"width": 64, "height": 48, "steps": 2, "frame_window": 17,
                                                "motion_frames": 5},
                 "WanTalkVAELoader": {"precision": "fp32"}}
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
            for name, value in node["inputs"].items():
                if isinstance(value, list) and value[0] in encoders:
                    node["inputs"][name] = [stand_in, STAND_IN_SLOTS[name]]
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


@_param_or_none(API_WORKFLOWS)
def test_api_workflow_runs_and_writes_a_video(workflow, request, tmp_path):
    if workflow is None:
        pytest.skip(NO_WORKFLOWS)
    tiny_models = _tiny_model_maker()
    base_url, run_dir = request.getfixturevalue("comfy_server")
    real_to_tiny = tiny_models.make_tiny_models(os.path.join(run_dir, "models")) or {}
    if hasattr(tiny_models, "make_tiny_inputs"):  # images/audio the workflows load from input/
        tiny_models.make_tiny_inputs(os.path.join(run_dir, "input"))
    if hasattr(tiny_models, "make_tiny_embeddings"):  # stand-in text/CLIP embeddings for Load Embeddings
        tiny_models.make_tiny_embeddings(os.path.join(run_dir, "output", "wantalk_embeddings", STAND_IN_EMBEDDINGS))
    devices = _get_json(f"{base_url}/system_stats").get("devices", [])
    cpu_server = all(device.get("type") == "cpu" for device in devices)
    with open(workflow, encoding="utf-8") as f:
        api, changes = _tiny_api_graph(json.load(f), real_to_tiny, cpu_server)
    print(f"{os.path.basename(workflow)} on tiny weights, changed:\n  " + "\n  ".join(changes or ["nothing"]))
    tiny_workflow = tmp_path / "tiny_api.json"
    tiny_workflow.write_text(json.dumps(api), encoding="utf-8")
    saved_dir = tmp_path / "outputs"
    result = subprocess.run(
        [_comfy_python(), _tool("run_prompt.py"), base_url, str(tiny_workflow), "--save-outputs", str(saved_dir),
         "--timeout", str(PROMPT_TIMEOUT_S), "--quiet"],
        capture_output=True, text=True)
    report = json.loads(result.stdout) if result.stdout.strip().startswith("{") else {}
    assert result.returncode == 0 and report.get("status") == "success", (
        f"run_prompt.py exit {result.returncode}\nreport: {json.dumps(report, indent=1)[:6000]}\n"
        f"stderr: {result.stderr[-3000:]}")
    videos = [f for f in report.get("files", []) if f.lower().endswith(VIDEO_EXTENSIONS) and os.path.getsize(f) > 0]
    assert videos, f"no video among the outputs: {report.get('outputs')}"
    if any(node["class_type"] == "CreateVideo" and "audio" in node["inputs"] for node in api.values()):
        streams = subprocess.run([_comfy_python(), "-c", STREAM_KINDS, videos[0]], capture_output=True, text=True)
        assert streams.stdout.split() == ["audio", "video"], f"{videos[0]}: streams {streams.stdout} {streams.stderr}"


# Stream kinds of a video file, read with PyAV in ComfyUI's venv (ComfyUI's video nodes need it there).
STREAM_KINDS = "import av, sys; print(*sorted({s.type for s in av.open(sys.argv[1]).streams}))"


def _ui_node_types(ui_workflow: dict) -> set[str]:
    """Node types a UI workflow uses (subgraph contents included, subgraph instances excluded)."""
    subgraphs = (ui_workflow.get("definitions") or {}).get("subgraphs") or []
    nodes = list(ui_workflow.get("nodes", []))
    for subgraph in subgraphs:
        nodes += subgraph.get("nodes", [])
    subgraph_ids = {s.get("id") for s in subgraphs}
    return {n["type"] for n in nodes if n.get("type") not in subgraph_ids} - FRONTEND_ONLY_TYPES


@_param_or_none(UI_WORKFLOWS)
def test_ui_workflow_converts_in_the_real_frontend(workflow, request, tmp_path):
    if workflow is None:
        pytest.skip(NO_WORKFLOWS)
    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium")
    if not chromium:
        pytest.skip("chromium not found (apt-get install -y chromium, or set CHROMIUM): UI conversion skipped")
    base_url, _ = request.getfixturevalue("comfy_server")
    known = set(_get_json(f"{base_url}/object_info"))
    with open(workflow, encoding="utf-8") as f:
        missing = _ui_node_types(json.load(f)) - known
    assert not missing, f"{os.path.basename(workflow)} uses node types the server does not have: {sorted(missing)}"
    api_path = tmp_path / "workflow_api.json"
    result = subprocess.run(
        [_comfy_python(), _tool("ui_to_api.py"), base_url, workflow, str(api_path), "--chromium", chromium],
        capture_output=True, text=True)
    assert result.returncode == 0, f"ui_to_api.py exit {result.returncode}:\n{result.stderr[-3000:]}"
    with open(api_path, encoding="utf-8") as f:
        api = json.load(f)
    assert api, "the frontend produced an empty API graph"
    unknown = {node["class_type"] for node in api.values()} - known
    assert not unknown, f"the converted graph has node types the server does not have: {sorted(unknown)}"
