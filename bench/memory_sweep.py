"""`python bench/memory.py --sweep`: every planned run completes, every other one is refused before sampling.

Full-size 14B + InfiniteTalk (random weights of the real shapes), built once per quantization and moved to the
host as `load_device=offload_device` leaves it. Each case caps the process at a card size
(`torch.cuda.set_per_process_memory_fraction`), lets block swap `auto` plan it, and runs one DiT forward; a run
the plan refuses must raise MemoryPlanError before any block runs, and no case may end in a CUDA out-of-memory
error. Per case: planned peak (what the plan bounds, allocator reserve included), allocated and reserved peaks.

Fewer blocks, same memory profile: a forward computes block 0 and the first two streamed blocks (slot 0 and
slot 1); the other blocks pass the tokens on. Every block has the same shapes, and the
resident weights, the swap slots and the model's other weights are all allocated as in a full forward, so the
peak of these blocks is the peak of the forward; it keeps a 147,600-token (720p, 161 frames) case to seconds.

Allocators (each in its own process, since the backend is fixed when CUDA starts):
- `default`: nothing set, as `run_demo.py` or a bare script starts; the pack turns on expandable segments;
- `async`: `PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync`, what ComfyUI selects by default on torch 2 + CUDA;
- `fixed`: `expandable_segments:False`, a user who opted out; the plan reserves room for fragmentation.

    python bench/memory.py --sweep                       # on a CUDA GPU, about 400 s
    python bench/memory.py --sweep --tiny                # CPU dry run: tiny model, emulated caps, no peaks
"""
import gc
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.abspath(__file__))
GB = 10**9
GIB = 2**30
SIZES = {"480p": (480, 832), "720p": (720, 1280)}
TINY_SIZES = {"480p": (48, 80), "720p": (64, 128)}
CAPS_GB = (8, 12, 16, 24)
PARTS = {  # allocator -> (PYTORCH_CUDA_ALLOC_CONF, share of the time budget, grid)
    "default": (None, 0.56, dict(modes=("fp4", "fp8"), frames=(5, 33, 81, 161), speakers=(1, 2))),
    "async": ("backend:cudaMallocAsync", 0.22, dict(modes=("fp4",), frames=(33, 81, 161), speakers=(1,))),
    "fixed": ("expandable_segments:False", 0.22, dict(modes=("fp4",), frames=(33, 81, 161), speakers=(1,))),
}
MODES = {"fp4": "fp4", "fp8": "fp8_e4m3fn_scaled_fast"}
TINY_MODES = {"fp4": "fp4", "fp8": "fp8_e4m3fn_scaled"}


class ComputeSome:
    """The block swapper as the model's block runner, computing only block 0 and the first two streamed blocks
    (see the module docstring); the others return their input."""

    def __init__(self, swapper):
        self.swapper = swapper
        self.computed = []

    def __call__(self, index, block, x, inputs):
        swapper = self.swapper
        keep = swapper.num_blocks - swapper.blocks_to_swap  # known once block 0 has planned
        if index in (0, keep, keep + 1):
            out = swapper(index, block, x, inputs)  # block 0 plans first: a refusal computes nothing
            self.computed.append(index)
            return out
        return x


def cases(grid, tiny=False):
    for mode in grid["modes"]:
        for size in SIZES:
            for frames in grid["frames"]:
                for speakers in grid["speakers"]:
                    for cap in CAPS_GB:
                        yield mode, size, frames, speakers, cap


def run_part(part: str, deadline: float, tiny: bool) -> list[dict]:
    """One allocator's cases in this process; stops starting cases at `deadline` (time.time())."""
    import torch
    sys.path.insert(0, ROOT)
    from _common import import_core, reference_shapes
    from forward import random_fetch
    from memory import forward_call
    import_core()
    from wantalk.wanvideo import block_swap, memory_plan
    from wantalk.wanvideo.loader import assemble_model

    device = torch.device("cpu" if tiny else "cuda")
    grid = PARTS[part][2]
    if tiny:
        torch.set_num_threads(1)
        shapes = tiny_shapes()
    else:
        shapes = reference_shapes("keys_infinitetalk.txt")
        total = torch.cuda.get_device_properties(0).total_memory
    results = []
    for mode in grid["modes"]:
        if time.time() > deadline:
            break
        t0 = time.perf_counter()
        gen = torch.Generator(device=device).manual_seed(0)
        model = assemble_model(shapes, random_fetch(shapes, device, torch.bfloat16, gen), device=device,
                               base_dtype=torch.float32 if tiny else torch.bfloat16,
                               quantization=(TINY_MODES if tiny else MODES)[mode], files=("keys_infinitetalk",))
        model.to("cpu")
        gc.collect()
        if not tiny:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        print(f"[{part}] built {mode} in {time.perf_counter() - t0:.1f} s", flush=True)
        tiny_total = memory_plan.ModelBytes.of(model).total
        swapper = None
        for m, size, frames, speakers, cap in cases(dict(grid, modes=(mode,))):
            if time.time() > deadline:
                results.append({"part": part, "mode": mode, "size": size, "frames": frames, "speakers": speakers,
                                "cap_gb": cap, "outcome": "not run (time)"})
                continue
            if swapper is not None:
                model.block_runner = swapper
                block_swap.release_vram(model)  # each case starts as on a fresh card of its size
            if tiny:
                # the plan's fixed terms, then 8..24 GB -> 0.5..1.5 x the tiny model and 8..24 MiB of activations
                allowed = memory_plan.BASE_MARGIN + memory_plan.Allocator().overhead(0) + 64 * 2**20 + \
                    int(tiny_total * cap / 16) + cap * 2**18
                extra = {"available_bytes": lambda: allowed + swapper._held()}
            else:
                torch.cuda.empty_cache()
                torch.cuda.set_per_process_memory_fraction(min(1.0, cap * GB / total))
                allowed = int(min(1.0, cap * GB / total) * total)
                extra = {}
                note = None
                if memory_plan.memory_fraction(torch.device("cuda", 0)) == 1.0 and cap * GB < total:
                    # this allocator cannot report the cap (a real card's size shows in mem_get_info): tell the plan
                    extra = {"available_bytes": lambda: min(memory_plan.available_vram(device),
                                                            allowed - torch.cuda.memory_allocated()) + swapper._held()}
                    note = "cap given to the plan (the allocator cannot report it)"
            swapper = block_swap.configure_block_swap(model, -1, device=device, prefetch=1, **extra)
            runner = ComputeSome(swapper)
            height, width = (TINY_SIZES if tiny else SIZES)[size]
            run = memory_plan.RunSettings(memory_plan.video_tokens(frames, height, width), two_speakers=speakers == 2)
            row = {"part": part, "mode": mode, "size": size, "frames": frames, "speakers": speakers, "cap_gb": cap,
                   "allowed_gib": allowed / GIB, **({"note": note} if not tiny and note else {})}
            fn = None
            t1 = time.perf_counter()
            try:
                memory_plan.check_before_sampling(model, run)  # as the InfiniteTalk and HuMo pipelines do
                model.block_runner = runner
                fn = forward_call(model, frames, height, width, speakers, device=device)
                peaks = forward_peaks(fn, tiny)
                plan = swapper.plan
                row.update(outcome="ran", blocks_to_swap=swapper.blocks_to_swap, computed=runner.computed,
                           tokens=plan.tokens, planned_gib=plan.peak / GIB, reserve_gib=plan.reserve / GIB,
                           allocator=plan.allocator.describe(), **peaks)
                if not tiny:  # again with the cap lowered to the planned peak: the plan alone must be enough
                    torch.cuda.set_per_process_memory_fraction(min(1.0, plan.peak / total))
                    try:
                        row.update({"tight_" + k: v for k, v in forward_peaks(fn, tiny).items()}, tight="ran")
                    except torch.OutOfMemoryError as exc:
                        row.update(tight="OOM", tight_message=str(exc).splitlines()[0][:300])
            except memory_plan.MemoryPlanError as exc:
                row.update(outcome="refused", before_sampling=runner.computed == [],
                           message=str(exc).splitlines()[0])
            except torch.OutOfMemoryError as exc:
                planned = swapper.plan.peak / GIB if swapper.plan and swapper.plan.tokens == run.tokens else None
                row.update(outcome="OOM", message=str(exc).splitlines()[0][:300], planned_gib=planned)
            row["seconds"] = time.perf_counter() - t1
            del fn
            gc.collect()
            print(json.dumps(row), flush=True)
            results.append(row)
            if os.environ.get("OUT"):  # kept even if the sweep is cut short
                with open(os.path.join(os.environ["OUT"], "memory_sweep_rows.jsonl"), "a") as f:
                    f.write(json.dumps(row) + "\n")
        model.block_runner = swapper
        block_swap.remove_block_swap(model, "cpu")
        del model, swapper
        gc.collect()
        if not tiny:
            torch.cuda.set_per_process_memory_fraction(1.0)
            torch.cuda.empty_cache()
    return results


def forward_peaks(fn, tiny: bool) -> dict:
    """Run one forward; its allocated and reserved peaks (GiB) on a GPU, after releasing unused cached memory."""
    import torch
    if tiny:
        with torch.no_grad():
            fn()
        return {}
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        fn()
    torch.cuda.synchronize()
    return {"allocated_gib": torch.cuda.max_memory_allocated() / GIB,
            "reserved_gib": torch.cuda.max_memory_reserved() / GIB}


def tiny_shapes() -> dict:
    """Key -> shape of a 6-block tiny Wan I2V + InfiniteTalk (tests/tiny_models.py), real key names."""
    sys.path.insert(0, os.path.join(os.path.dirname(ROOT), "tests"))
    from tiny_models import TINY_I2V, tiny_addon_model, tiny_infinitetalk_config
    from wantalk.multitalk.model_addon import infinitetalk_addon
    model, sd = tiny_addon_model(TINY_I2V.with_(num_layers=6), infinitetalk_addon(tiny_infinitetalk_config()))
    return {k: tuple(v.shape) for k, v in sd.items()}


def table(rows: list[dict]) -> str:
    lines = ["| allocator | quant | size | frames | speakers | cap GB | outcome | blocks swapped | planned GiB | "
             "allocated GiB | reserved GiB | cap = planned: reserved GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [r["part"], r["mode"], r["size"], r["frames"], r["speakers"], r["cap_gb"], r["outcome"]]
        if r["outcome"] == "ran":
            tight = f"{r['tight_reserved_gib']:.2f}" if r.get("tight") == "ran" else r.get("tight", "")
            cells += [r["blocks_to_swap"], f"{r['planned_gib']:.2f}", f"{r.get('allocated_gib', 0):.2f}",
                      f"{r.get('reserved_gib', 0):.2f}", tight]
        elif r["outcome"] == "refused":
            cells += ["-", "refused before sampling" if r["before_sampling"] else "REFUSED MID-RUN", "", "", ""]
        else:
            cells += ["-", f"{r.get('planned_gib') or 0:.2f}", "", "", ""]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def verdict(rows: list[dict]) -> str:
    ran = [r for r in rows if r["outcome"] == "ran"]
    refused = [r for r in rows if r["outcome"] == "refused"]
    ooms = [r for r in rows if r["outcome"] == "OOM"]
    late = [r for r in refused if not r["before_sampling"]]
    tight = [r for r in ran if r.get("tight") == "ran"]
    tight_ooms = [r for r in ran if r.get("tight") == "OOM"]
    skipped = [r for r in rows if r["outcome"].startswith("not run")]
    return (f"{len(rows)} cases: {len(ran)} planned and completed, {len(refused)} refused "
            f"({len(late)} after sampling began), {len(ooms)} out-of-memory, {len(skipped)} not run (time). "
            f"Rerun with the cap lowered to the planned peak: {len(tight)} completed, {len(tight_ooms)} "
            f"out-of-memory. Planned minus allocated peak: min "
            f"{min((r['planned_gib'] - r.get('allocated_gib', 0) for r in ran), default=0):.2f} GiB.")


def main(argv):
    import argparse
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--tiny", action="store_true", help="CPU dry run on a tiny model")
    p.add_argument("--device", default=None, help="cpu implies --tiny")
    p.add_argument("--budget-s", type=float, default=390, help="wall time for the whole sweep")
    p.add_argument("--parts", default=",".join(PARTS), help="allocators to sweep: " + ", ".join(PARTS))
    p.add_argument("--modes", default=None, help="only these quantizations (fp4,fp8)")
    p.add_argument("--frames", default=None, help="only these frame counts, e.g. 33,161")
    p.add_argument("--part", default=None, help=argparse.SUPPRESS)   # a child process: one allocator
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    tiny = args.tiny or args.device == "cpu"
    for name, (_, _, grid) in PARTS.items():
        if args.modes:
            grid["modes"] = tuple(m for m in grid["modes"] if m in args.modes.split(","))
        if args.frames:
            grid["frames"] = tuple(int(f) for f in args.frames.split(","))
    if args.part:
        for row in run_part(args.part, args.deadline, tiny):
            print("RESULT " + json.dumps(row), flush=True)
        return
    start, rows = time.time(), []
    parts = args.parts.split(",")
    shares = sum(PARTS[name][1] for name in parts)
    spent = 0.0
    for name in parts:
        conf, share, _ = PARTS[name]
        spent += share / shares
        deadline = start + spent * args.budget_s - 10  # the last case and the teardown
        env = dict(os.environ)
        env.pop("PYTORCH_ALLOC_CONF", None)
        if conf is None:
            env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
        else:
            env["PYTORCH_CUDA_ALLOC_CONF"] = conf
        cmd = [sys.executable, os.path.abspath(__file__), "--part", name, "--deadline", str(deadline)]
        cmd += [f"--{opt}={value}" for opt, value in (("modes", args.modes), ("frames", args.frames)) if value]
        if tiny:
            cmd.append("--tiny")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                              timeout=max(30.0, start + args.budget_s - time.time()))
        got = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        rows += got
        if proc.returncode != 0:
            print(f"[{name}] exited with {proc.returncode}:\n{proc.stderr[-3000:]}", flush=True)
        else:
            print(f"[{name}] {len(got)} cases in {time.time() - start:.0f} s (total)", flush=True)
    import torch
    info = "CPU dry run (tiny model, emulated caps)" if tiny else \
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    print(f"\n{info}, {time.strftime('%Y-%m-%d')}, python bench/memory.py --sweep\n")
    print(table(rows))
    print("\n" + verdict(rows))
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "memory_sweep.json"), "w") as f:
            json.dump({"device": info, "rows": rows, "verdict": verdict(rows)}, f, indent=1)
        with open(os.path.join(out, "memory_sweep.md"), "w") as f:
            f.write(table(rows) + "\n\n" + verdict(rows) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
