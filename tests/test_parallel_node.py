"""The Multi-GPU node: GPU list and layout checks with errors that name the input, and an end-to-end run of its
model on two CPU workers; ComfyUI's free-memory request stops the workers."""
import types

import pytest
import torch

from test_parallel import BOUND, CFG, GRID, Tiny, infinitetalk_run, sample
from tiny_models import tiny_infinitetalk_config
from wantalk.multitalk.model_addon import infinitetalk_addon
from wantalk.nodes_common import NodeInputError
from wantalk import host
from wantalk.nodes_parallel import WanTalkMultiGPU, choose_layout, parse_devices
from wantalk.wanvideo.parallel import hosting
from wantalk.wanvideo.parallel.layout import Layout


def test_gpu_list():
    assert parse_devices(" 0, 1,2 ", 4) == ["cuda:0", "cuda:1", "cuda:2"]
    assert parse_devices("cpu,cpu", 0) == ["cpu", "cpu"]
    for text, message in [("0", "at least two"), ("0,4", "not a GPU index"), ("0,x", "not a GPU index"),
                          ("1,1", "named twice"), ("", "at least two"), ("0,cpu", "mixes GPUs and cpu")]:
        with pytest.raises(NodeInputError, match=f"input 'gpus'.*{message}"):
            parse_devices(text, 4)
    with pytest.raises(NodeInputError, match="has no CUDA GPU"):
        parse_devices("0,1", 0)


def test_layout_choice():
    assert choose_layout(2, 0, 40) == Layout(1, 2)
    assert choose_layout(6, 0, 40) == Layout(3, 2)
    assert choose_layout(8, 0, 40) == Layout(1, 8)
    assert choose_layout(4, 2, 40) == Layout(2, 2)
    with pytest.raises(NodeInputError, match="input 'guidance_groups'.*cannot form 3 equal groups"):
        choose_layout(4, 3, 40)
    with pytest.raises(NodeInputError, match="40 heads over its 3 GPUs"):
        choose_layout(3, 1, 40)


def test_model_without_load_recipe_is_refused():
    from tiny_models import tiny_infinitetalk
    model, _ = tiny_infinitetalk(torch.Generator().manual_seed(0))
    with pytest.raises(NodeInputError, match="input 'model'.*not loaded by the wantalk model loader"):
        WanTalkMultiGPU().configure(model, "cpu,cpu", 0)


@pytest.mark.parametrize("gpus, groups, message", [
    ("cpu,cpu", -1, r"input 'guidance_groups': must be between 0 and 8, got -1"),
    ("cpu,cpu", 1.5, r"input 'guidance_groups': expected a whole number"),
    (5, 0, r"input 'gpus': expected text, got 5")])
def test_widget_values_are_checked_against_the_inputs(gpus, groups, message):
    from tiny_models import tiny_infinitetalk
    model, _ = tiny_infinitetalk(torch.Generator().manual_seed(0))
    with pytest.raises(NodeInputError, match=message):
        WanTalkMultiGPU().configure(model, gpus, groups)


def test_node_model_samples_like_one_process_and_free_memory_stops_workers(tmp_path, monkeypatch):
    fake_mm = types.SimpleNamespace(unload_all_models=lambda: None,
                                    throw_exception_if_processing_interrupted=lambda: None)
    monkeypatch.setattr(host, "_mm", fake_mm)
    host.on_unload_all_models(hosting.stop_all)   # as nodes_parallel does when ComfyUI is there
    tiny = Tiny(tmp_path, "it.safetensors", CFG, infinitetalk_addon(tiny_infinitetalk_config()),
                torch.Generator().manual_seed(3))
    cond, plan = infinitetalk_run(tiny.model, 1)
    noise = torch.randn(1, 16, *GRID)
    (parallel,) = WanTalkMultiGPU().configure(tiny.model, "cpu,cpu", 0)
    try:
        got = sample(parallel, cond, plan, noise)
        expected = sample(tiny.model, cond, plan, noise)
        assert ((got - expected).abs().max() / expected.abs().max()).item() <= BOUND
        (pack,) = hosting._live.values()
        processes = [w.process for w in pack.workers]
        fake_mm.unload_all_models()
        assert not pack.running and all(p.poll() is not None for p in processes)
    finally:
        hosting.stop_all()
