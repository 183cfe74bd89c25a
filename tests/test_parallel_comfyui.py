"""The Multi-GPU node inside a real ComfyUI (two CPU workers, gloo): the InfiniteTalk and HuMo example graphs with
the node between loader and sampler run; the workers stay across prompts; Cancel ends the prompt within seconds and
keeps them; the free-memory request stops them. Needs COMFYUI_DIR (skipped otherwise)."""
import json
import os
import time

import pytest

import tiny_models
from comfy_server import ComfyServer, comfyui_dir

pytestmark = pytest.mark.skipif(not comfyui_dir(), reason="COMFYUI_DIR not set: real-ComfyUI tests skipped")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOWS = {"infinitetalk": ("infinitetalk_single_api.json", "WanTalkInfiniteTalkSampler"),
             "humo": ("humo_17b_api.json", "WanTalkHuMoSampler")}


def worker_pids(server) -> set[int]:
    """The server's worker processes (children running worker_main.py)."""
    pids = set()
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                command = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent == server.process.pid and any(part.endswith(b"worker_main.py") for part in command):
            pids.add(int(entry))
    return pids


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ComfyServer(comfyui_dir(), ROOT, base_dir=str(tmp_path_factory.mktemp("comfy-parallel")),
                     extra_args=("--disable-api-nodes",)) as running:
        yield running


def graph(server, workflow="infinitetalk", **sampler) -> dict:
    from test_comfyui import STAND_IN_EMBEDDINGS, _tiny_api_graph
    name, sampler_class = WORKFLOWS[workflow]
    real_to_tiny = tiny_models.make_tiny_models(os.path.join(server.base_dir, "models"))
    tiny_models.make_tiny_inputs(os.path.join(server.base_dir, "input"))
    tiny_models.make_tiny_embeddings(os.path.join(server.base_dir, "output", "wantalk_embeddings",
                                                  STAND_IN_EMBEDDINGS))
    with open(os.path.join(ROOT, "example_workflows", "api", name)) as f:
        api, _ = _tiny_api_graph(json.load(f), real_to_tiny, cpu_server=True)
    loader = next(k for k, node in api.items() if node["class_type"] == "WanTalkModelLoader")
    sampler_key = next(k for k, node in api.items() if node["class_type"] == sampler_class)
    api["900"] = {"class_type": "WanTalkMultiGPU", "inputs": {"model": [loader, 0], "gpus": "cpu,cpu",
                                                              "guidance_groups": 0}}
    api[sampler_key]["inputs"].update(model=["900", 0], **sampler)
    return api


def test_multi_gpu_node_in_comfyui(server):
    server.run_prompt(graph(server, seed=1))
    workers = worker_pids(server)
    assert len(workers) == 2
    server.run_prompt(graph(server, seed=2))
    assert worker_pids(server) == workers, "the workers were restarted between prompts"

    status, body = server.request("/prompt", {"prompt": graph(server, seed=3, steps=200)})
    prompt_id = json.loads(body)["prompt_id"]
    time.sleep(5)
    server.request("/interrupt", {})
    cancelled = time.monotonic()
    while time.monotonic() - cancelled < 15:
        entry = server.get(f"/history/{prompt_id}").get(prompt_id)
        if entry and entry["status"].get("completed") is not None:
            break
        time.sleep(0.2)
    assert time.monotonic() - cancelled < 15, "the cancelled prompt did not end"
    assert entry["status"]["status_str"] == "error"
    assert worker_pids(server) == workers, "Cancel should keep the loaded workers"

    server.request("/free", {"unload_models": True})
    deadline = time.monotonic() + 20
    while worker_pids(server) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not worker_pids(server), "the free-memory request should stop the workers"


def test_humo_graph_on_the_multi_gpu_node(server):
    server.run_prompt(graph(server, "humo", seed=4))
    assert len(worker_pids(server)) == 2
