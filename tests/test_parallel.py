"""Multi-GPU sampling on CPU: worker packs of 2, 3 and 4 gloo processes on tiny weights (real key names) give the
frames of one process. Bound: relative max error <= 1e-5 (float32 rounding; on CPU the split is exact in practice,
every token's arithmetic being the same). Faults: a worker killed mid-window gives a clear error and the next run
recovers; an interrupt stops every worker within a second or two and the pack stays usable."""
import os
import signal
import threading
import time

import pytest
import torch

from tiny_models import TINY_I2V, save_state_dict, tiny_addon_model, tiny_infinitetalk_config
from wantalk.humo.conditioning import humo_conditioning, zero_humo_conditioning
from wantalk.humo.model_addon import HumoConfig, humo_addon
from wantalk.multitalk.conditioning import audio_conditioning, zero_audio_conditioning
from wantalk.multitalk.model_addon import infinitetalk_addon
from wantalk.wanvideo.loader import load_wan_model
from wantalk.wanvideo.parallel import messages
from wantalk.wanvideo.parallel.hosting import ParallelModel
from wantalk.wanvideo.parallel.layout import Layout
from wantalk.wanvideo.parallel.pack import WorkerFailed, WorkerPack
from wantalk.wanvideo.sampling import Conditioning, Guidance, denoise
from wantalk.wanvideo.schedulers import make_scheduler

BOUND = 1e-5
HEADS = 6                                   # divisible by 2 and 3: sequence parallel over 2 or 3 ranks
CFG = TINY_I2V.with_(dim=192, ffn_dim=256, num_heads=HEADS)
GRID = (3, 6, 10)                           # latent frames, h, w: 3 x 3 x 5 = 45 tokens (odd: padded slices
                                            # that cut frames in the middle)
HUMO = HumoConfig(window=8, bands=5, audio_channels=16, intermediate_dim=32, output_dim=32, context_tokens=4)


class Tiny:
    """A model file, its load recipe (as the workers get it), and the model loaded here for the reference."""

    def __init__(self, folder, name, cfg, addon, rng):
        _, sd = tiny_addon_model(cfg, addon, rng)
        path = save_state_dict(sd, os.path.join(folder, name))
        overrides = {"num_heads": cfg.num_heads}  # dim 192 is not a multiple of 128: the loader needs the count
        self.recipe = dict(path=path, base_dtype="float32", quantization="disabled", attention_mode="auto",
                           params_to_keep=None, extra_weights=(), config_overrides=overrides, loras=())
        self.model = load_wan_model(path, base_dtype=torch.float32, config_overrides=overrides)
        self.model.load_recipe = self.recipe


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("parallel")
    rng = torch.Generator().manual_seed(int(time.time()))
    return {"infinitetalk": Tiny(folder, "it.safetensors", CFG, infinitetalk_addon(tiny_infinitetalk_config()), rng),
            "humo": Tiny(folder, "humo.safetensors", CFG.with_(image_branch=False), humo_addon(HUMO), rng)}


def _pack(devices):
    pack = WorkerPack(devices)
    yield pack
    pack.stop()


@pytest.fixture(scope="module")
def pack2():
    yield from _pack(["cpu"] * 2)


@pytest.fixture(scope="module")
def pack3():
    yield from _pack(["cpu"] * 3)


def infinitetalk_run(model, speakers, grid=GRID):
    f, h, w = grid
    acfg = model.cfg.audio
    frames = 4 * (f - 1) + 1
    windows = torch.randn(speakers, frames, acfg.audio_window, acfg.audio_layers, acfg.audio_channels)
    cond = Conditioning(torch.randn(1, 7, CFG.text_dim), torch.randn(1, 5, CFG.text_dim),
                        torch.randn(1, 257, CFG.clip_dim), torch.randn(1, 20, f, h, w),
                        audio=audio_conditioning(model, windows), audio_null=zero_audio_conditioning(model, frames))
    return cond, Guidance("infinitetalk", text_scale=5.0, audio_scale=4.0)


def humo_run(model, _speakers=1, grid=GRID):
    f, h, w = grid
    windows = torch.randn(f, HUMO.window, HUMO.bands, HUMO.audio_channels)
    cond = Conditioning(torch.randn(1, 7, CFG.text_dim), torch.randn(1, 5, CFG.text_dim), None,
                        torch.randn(1, 20, f, h, w), torch.randn(1, 20, f, h, w),
                        audio=humo_conditioning(model, windows), audio_null=zero_humo_conditioning(model, f))
    return cond, Guidance("humo_tia", scale=5.0, text_scale=7.5, audio_scale=5.5)


RUNS = {"infinitetalk": infinitetalk_run, "humo": humo_run}


def sample(model, cond, plan, noise, steps=2, **kw):
    # shift 1 with 2 steps: the first step has t > 980, so HuMo TIA uses both of its negative passes
    with torch.no_grad():
        return denoise(model, noise, make_scheduler("euler", steps, 1.0), cond, plan, **kw)


def check_frames(models, pack, kind, layout, speakers=1, grid=GRID):
    tiny = models[kind]
    cond, plan = RUNS[kind](tiny.model, speakers, grid)
    noise = torch.randn(1, 16, *grid)
    expected = sample(tiny.model, cond, plan, noise)
    pack.configure(layout, tiny.recipe)
    got = sample(ParallelModel(tiny.model, lambda: pack), cond, plan, noise)
    err = ((got - expected).abs().max() / expected.abs().max()).item()
    assert err <= BOUND, f"{kind} {layout} speakers={speakers}: relative error {err:.2e}"


def test_passes_are_dealt_round_robin_in_plan_order():
    names = ("cond", "drop_text", "uncond")
    assert [Layout(3, 1).passes_of(g, names) for g in range(3)] == [["cond"], ["drop_text"], ["uncond"]]
    assert [Layout(2, 2).passes_of(g, names) for g in range(2)] == [["cond", "uncond"], ["drop_text"]]
    assert Layout(2, 2).group_ranks(1) == [2, 3] and Layout(2, 2).group_of(3) == 1 and Layout(2, 2).is_leader(2)


def test_messages_carry_tensors_and_allowlisted_conditioning_only(models):
    from dataclasses import dataclass
    model = models["infinitetalk"].model
    audio, _ = infinitetalk_run(model, 2)
    back = messages.decode(messages.encode({"audio": audio.audio, "ids": [1, (2, None)], "x": torch.randn(3)}))
    assert type(back["audio"]) is type(audio.audio) and back["audio"].speakers == 2
    assert torch.equal(back["audio"].tokens, audio.audio.tokens) and back["ids"] == [1, (2, None)]

    @dataclass
    class Other:
        x: int = 1

    with pytest.raises(TypeError, match="cannot receive a Other"):
        messages.encode({"a": Other()})


@pytest.mark.parametrize("kind,speakers", [("infinitetalk", 1), ("infinitetalk", 2), ("humo", 1)])
@pytest.mark.parametrize("layout", [Layout(1, 2), Layout(2, 1)], ids=["sequence2", "guidance2"])
def test_two_processes_give_the_frames_of_one(models, pack2, kind, speakers, layout):
    check_frames(models, pack2, kind, layout, speakers)


@pytest.mark.parametrize("kind,speakers", [("infinitetalk", 2), ("humo", 1)])
@pytest.mark.parametrize("layout", [Layout(1, 3), Layout(3, 1)], ids=["sequence3", "guidance3"])
def test_three_processes_give_the_frames_of_one(models, pack3, kind, speakers, layout):
    check_frames(models, pack3, kind, layout, speakers)


def test_first_frame_spread_over_slices(models, pack3):
    """Two speakers with 2 latent frames on 3 ranks: 10 tokens a slice, the reference frame has 15."""
    check_frames(models, pack3, "infinitetalk", Layout(1, 3), speakers=2, grid=(2, 6, 10))


def test_guidance_and_sequence_combine(models):
    """4 processes: 2 guidance groups (3 passes: 2 + 1) x 2 sequence ranks, two speakers."""
    for pack in _pack(["cpu"] * 4):
        check_frames(models, pack, "infinitetalk", Layout(2, 2), speakers=2)


def test_interrupt_stops_every_worker_and_the_pack_stays(models, pack2):
    tiny = models["infinitetalk"]
    cond, plan = infinitetalk_run(tiny.model, 2)
    noise = torch.randn(1, 16, *GRID)
    pack2.configure(Layout(1, 2), tiny.recipe)
    pack2.ensure_ready()
    pids = pack2.pids()
    for pid in pids:  # NCCL multicast stays off in every worker
        environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        assert b"NCCL_NVLS_ENABLE=0" in environ and b"TORCH_SYMM_MEM_DISABLE_MULTICAST=1" in environ

    class Cancelled(Exception):
        pass

    started = time.monotonic()

    def check_interrupt():
        if time.monotonic() - started > 0.5:
            raise Cancelled()

    pack2.pace_s = 1.0   # every block sleeps 1 s: a step (3 passes x 2 blocks) would take 6 s
    try:
        with pytest.raises(Cancelled):
            sample(ParallelModel(tiny.model, lambda: pack2, check_interrupt), cond, plan, noise, steps=1)
    finally:
        pack2.pace_s = 0.0
    assert time.monotonic() - started < 3.0
    assert pack2.running and pack2.pids() == pids
    expected = sample(tiny.model, cond, plan, noise)
    got = sample(ParallelModel(tiny.model, lambda: pack2), cond, plan, noise)
    assert ((got - expected).abs().max() / expected.abs().max()).item() <= BOUND


def test_killed_worker_is_a_clear_error_and_the_next_run_recovers(models, pack2, caplog):
    tiny = models["infinitetalk"]
    cond, plan = infinitetalk_run(tiny.model, 1)
    noise = torch.randn(1, 16, *GRID)
    pack2.configure(Layout(1, 2), tiny.recipe)
    parallel = ParallelModel(tiny.model, lambda: pack2)
    pack2.ensure_ready()
    victim = pack2.pids()[1]
    killer = threading.Timer(0.5, os.kill, (victim, signal.SIGKILL))   # while a step is in flight
    pack2.pace_s = 0.2
    killer.start()
    try:
        with pytest.raises(WorkerFailed, match=rf"worker 1 \(cpu, pid {victim}\) died during a denoising step "
                                               rf"\(exit code -9\)"):
            sample(parallel, cond, plan, noise)
    finally:
        killer.join()
        pack2.pace_s = 0.0
    assert not pack2.workers
    expected = sample(tiny.model, cond, plan, noise)
    got = sample(parallel, cond, plan, noise)
    assert ((got - expected).abs().max() / expected.abs().max()).item() <= BOUND
    # A worker that dies between runs: the next step finds it, says so and restarts the pack.
    idle = pack2.workers[0].process
    idle.kill()
    idle.wait()
    got = sample(parallel, cond, plan, noise)
    assert ((got - expected).abs().max() / expected.abs().max()).item() <= BOUND
    assert "exited since the last step (exit codes [-9, None]); restarting all" in caplog.text


def test_head_count_not_divisible_is_a_clear_error(pack3, tmp_path):
    """(Last: a failed sequence-parallel step stops the pack.)"""
    tiny = Tiny(tmp_path, "odd.safetensors", CFG.with_(num_heads=2), infinitetalk_addon(tiny_infinitetalk_config()),
                torch.Generator().manual_seed(1))
    cond, plan = infinitetalk_run(tiny.model, 1)
    pack3.configure(Layout(1, 3), tiny.recipe)
    with pytest.raises(WorkerFailed, match="head count divisible by 3"):
        sample(ParallelModel(tiny.model, lambda: pack3), cond, plan, torch.randn(1, 16, *GRID), steps=1)


def test_bench_script_runs_on_cpu(tmp_path):
    """bench/parallel.py --tiny (the H200 timing script at a tiny size, gloo): one worker vs 2 sequence ranks."""
    import json
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "WANTALK_BENCH_DIR": str(tmp_path), "OUT": str(tmp_path)}
    run = subprocess.run([sys.executable, os.path.join(root, "bench", "parallel.py"), "--tiny", "--gpus", "cpu,cpu",
                          "--layouts", "1x1,1x2", "--steps", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "parallel.json")]
    assert [r["layout"] for r in rows] == ["1x1", "1x2"]
    assert rows[1]["latent_rel_err_vs_baseline"] <= BOUND and rows[1]["seconds_per_step"] > 0
