"""One multi-GPU worker: joins the process group, loads the model with the pack's own loader on its device, and
runs the guidance passes the sampler process sends, until told to exit.

Requests arrive on a private socket (`messages` bytes). A step request carries the latent, the timestep, the pass
arguments by reference (tensors and conditioning are sent once per window and cached here) and which passes each
guidance group runs. SIGUSR1 asks for a stop: every block boundary checks it (ranks of a sequence group
agree through one all-reduce), so an interrupt ends the current forward within one block.
"""
from __future__ import annotations

import logging
import os
import signal
import time
import traceback
from datetime import timedelta
from multiprocessing.connection import Connection

import torch
import torch.distributed as dist

from ..loader import load_wan_model
from ..sampling import run_passes
from . import messages
from .layout import Layout
from .sequence import SequenceParallel


class Stopped(Exception):
    """The sampler process asked this worker to stop the current step (interrupt)."""


class StopFlag:
    """Set by SIGUSR1; read at block boundaries. With a sequence `group` (gloo, on the CPU: the GPU queue is never
    drained for it), its ranks agree through one all-reduce, so that they all stop at the same block and none
    waits in a collective for a peer that stopped."""

    def __init__(self):
        self.requested = False
        self.group = None
        signal.signal(signal.SIGUSR1, self._on_signal)

    def _on_signal(self, *_):
        self.requested = True

    def check(self) -> None:
        stop = self.requested
        if self.group is not None:
            flag = torch.tensor([float(stop)])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
            stop = bool(flag.item())
        if stop:
            raise Stopped()


def stop_checking_runner(flag: StopFlag, inner, pacing):
    """A `WanModel.block_runner` that checks the stop flag before every block (and calls `inner` if any).
    `pacing.pace_s` sleeps before each block: tests use it to keep a forward in flight long enough to interrupt."""
    def run(index, block, x, inputs):
        if pacing.pace_s:
            time.sleep(pacing.pace_s)
        flag.check()
        return block(x, inputs) if inner is None else inner(index, block, x, inputs)
    return run


def _groups(layout: Layout) -> tuple:
    """This rank's sequence group (NCCL on GPUs) and its gloo twin for the stop flag. Every rank creates every
    group, in the same order (torch.distributed requires it)."""
    mine = (None, None)
    for g in range(layout.guidance):
        ranks = layout.group_ranks(g)
        groups = (dist.new_group(ranks), dist.new_group(ranks, backend="gloo"))
        if g == layout.group_of(dist.get_rank()):
            mine = groups
    return mine


def _load(recipe: dict, device: torch.device):
    recipe = dict(recipe)
    recipe["base_dtype"] = getattr(torch, recipe["base_dtype"])
    return load_wan_model(recipe.pop("path"), device=device, **recipe)


class Worker:
    """This process's rank, device, model and cache; `configure` (re)loads the model and (re)splits the ranks."""

    def __init__(self, rank: int, world: int, device: str, port: int):
        self.rank, self.device = rank, torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(minutes=30))
        self.flag = StopFlag()
        self.layout, self.group, self.recipe, self.model, self.pace_s = None, None, None, None, 0.0
        self.cache: dict = {}
        self.groups: dict = {}   # layout -> this rank's (sequence group, stop-flag group)

    def configure(self, request: dict) -> None:
        layout = Layout(request["guidance"], request["sequence"])
        if request["recipe"] != self.recipe:
            self.model = self.recipe = None
            self.cache.clear()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.model = _load(request["recipe"], self.device)
            self.model.block_runner = stop_checking_runner(self.flag, self.model.block_runner, self)
            self.recipe = request["recipe"]
        if layout != self.layout:
            if layout not in self.groups:  # made once per layout: communicators are not cheap
                self.groups[layout] = _groups(layout) if layout.sequence > 1 else (None, None)
            self.group, self.flag.group = self.groups[layout]
            self.layout = layout
        self.model.sequence_parallel = None if self.group is None else SequenceParallel(self.group)


def serve(conn: Connection, rank: int, world: int, device: str, port: int) -> None:
    worker = Worker(rank, world, device, port)
    try:
        while True:
            try:
                request = messages.decode(conn.recv_bytes())
            except EOFError:  # the sampler's process is gone: nobody to serve
                break
            kind = request["kind"]
            if kind == "exit":
                break
            try:
                if kind == "load":
                    worker.configure(request)
                    reply = {"kind": "ready"}
                else:  # "step"
                    reply = {"kind": "done", "preds": _step(worker, request)}
            except Stopped:
                reply = {"kind": "stopped"}
            except Exception as exc:  # reported to the sampler process, which raises it there
                reply = {"kind": "error", "message": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
            conn.send_bytes(messages.encode(reply))
    finally:
        dist.destroy_process_group()


def _step(worker: Worker, request: dict) -> dict:
    worker.flag.requested = False  # a stop that arrived after the previous step ended is stale
    worker.pace_s = request["pace_s"]
    cache, device = worker.cache, worker.device
    for key in request["drop"]:
        cache.pop(key, None)
    cache.update({key: _to(value, device) for key, value in request["new"].items()})
    mine = request["passes"][worker.layout.group_of(worker.rank)]
    passes = {name: {arg: cache[key] if key is not None else None for arg, key in refs.items()}
              for name, refs in mine.items()}
    latent, timestep = request["latent"].to(device), request["timestep"].to(device)
    with torch.no_grad():
        preds = run_passes(worker.model, latent, timestep, passes)
    return {name: p.cpu() for name, p in preds.items()} if worker.layout.is_leader(worker.rank) else {}


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if hasattr(value, "tokens"):  # add-on conditioning: its tensors follow the model
        for name in ("tokens", "masks"):
            if isinstance(getattr(value, name, None), torch.Tensor):
                setattr(value, name, getattr(value, name).to(device))
    return value


def main(fd: int, rank: int, world: int, device: str, port: int) -> None:
    logging.basicConfig(level=logging.INFO, format=f"[wantalk worker {rank}] %(message)s")
    # CPU workers (tests) share few cores: one thread each unless told otherwise; GPU workers keep torch's default.
    threads = os.environ.get("WANTALK_WORKER_THREADS") or ("1" if device == "cpu" else None)
    if threads:
        torch.set_num_threads(max(1, int(threads)))
    serve(Connection(fd), rank, world, device, port)
