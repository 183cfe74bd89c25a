"""The pack of worker processes, one per GPU, driven from the sampler's process.

Started once and kept across prompts; `configure` sets the model (each worker loads it with the pack's loader) and
the split into guidance x sequence ranks, reloading or re-splitting only what changed. Each denoising step sends
every worker the latent and its guidance group's passes and gathers the predictions from the group leaders.
Faults never leave a half-working pack: a worker that dies (or fails inside a sequence-parallel forward, where its
peers would wait forever) stops the whole pack with an error that says what happened, and the next step starts a
fresh one. An interrupt (`check_interrupt` raising) signals every worker, which stop at the next block boundary;
the pack stays loaded, unless a worker does not answer within `STOP_GRACE_S`, then it is stopped.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from multiprocessing.connection import Connection, wait

import torch

from . import messages
from .layout import Layout

log = logging.getLogger("wantalk")

WORKER_MAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker_main.py")
# NCCL multicast (NVLS) and symmetric-memory multicast stay off in the workers.
WORKER_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
STOP_GRACE_S = 5.0    # how long stopped workers may take to answer before the pack is torn down
EXIT_GRACE_S = 5.0    # how long a worker may take to exit before it is killed
FAILED_GRACE_S = 1.0  # the same after a failure (the others may be stuck in a collective with the failed one)
POLL_S = 0.05         # how often a wait checks for an interrupt


class WorkerFailed(RuntimeError):
    """A worker died or failed; the pack was stopped (the next step starts a fresh one)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Worker:
    def __init__(self, rank: int, world: int, device: str, port: int):
        ours, theirs = socket.socketpair()
        self.rank, self.device = rank, device
        args = [sys.executable, WORKER_MAIN, str(theirs.fileno()), str(rank), str(world), device, str(port)]
        # Own session: a Ctrl+C in ComfyUI's terminal reaches ComfyUI, which stops the workers in order.
        # gloo (CPU runs, the stop flag) talks over loopback unless the user chose an interface: all ranks are local.
        env = {"GLOO_SOCKET_IFNAME": "lo", **os.environ, **WORKER_ENV}
        self.process = subprocess.Popen(args, env=env, pass_fds=[theirs.fileno()], start_new_session=True)
        theirs.close()
        self.conn = Connection(ours.detach())

    def describe(self) -> str:
        return f"worker {self.rank} ({self.device}, pid {self.process.pid})"

    def exit_code(self, wait_s: float = 1.0):
        try:
            return self.process.wait(wait_s)
        except subprocess.TimeoutExpired:
            return None


class WorkerPack:
    """Worker processes on `devices` (one each, e.g. ["cuda:0", "cuda:1"] or ["cpu", "cpu"])."""

    def __init__(self, devices: list[str]):
        self.devices = list(devices)
        self.layout: Layout | None = None
        self.recipe: dict | None = None
        self.pace_s = 0.0                    # tests: seconds slept before each block (an interrupt has time to land)
        self.workers: list[_Worker] = []
        self._loaded: tuple | None = None    # (layout, recipe) the workers hold
        self._sent: dict[int, object] = {}   # id -> object the workers hold (kept alive so ids stay unique)

    @property
    def running(self) -> bool:
        return bool(self.workers) and all(w.process.poll() is None for w in self.workers)

    # -- life cycle -------------------------------------------------------------------------------------------
    def configure(self, layout: Layout, recipe: dict) -> None:
        """What the next step runs: the model `recipe` (keyword arguments of `load_wan_model`, base_dtype as a
        name) split as `layout`. Applied lazily by the next step."""
        if layout.world != len(self.devices):
            raise ValueError(f"{layout.guidance} guidance x {layout.sequence} sequence ranks need {layout.world} "
                             f"GPUs; the pack has {len(self.devices)}")
        self.layout, self.recipe = layout, dict(recipe)

    def ensure_ready(self, check_interrupt=None) -> None:
        if self.layout is None:
            raise RuntimeError("configure the pack (model and layout) before running steps")
        if not self.running:
            if self.workers:
                log.warning("wantalk: a multi-GPU worker exited since the last step (exit codes %s); restarting all",
                            [w.process.poll() for w in self.workers])
            self.stop()
            port = _free_port()
            self.workers = [_Worker(r, len(self.devices), d, port) for r, d in enumerate(self.devices)]
        if self._loaded != (self.layout, self.recipe):
            t0 = time.perf_counter()
            self._sent.clear()
            request = {"kind": "load", "recipe": self.recipe, "guidance": self.layout.guidance,
                       "sequence": self.layout.sequence}
            self._exchange(request, check_interrupt, "loading")
            self._loaded = (self.layout, self.recipe)
            log.info("wantalk: %d multi-GPU workers ready (%d guidance x %d sequence) in %.1fs", len(self.workers),
                     self.layout.guidance, self.layout.sequence, time.perf_counter() - t0)

    def stop(self, grace_s: float = EXIT_GRACE_S) -> None:
        """Ask every worker to exit, kill those that do not within `grace_s`; safe to call at any time."""
        for w in self.workers:
            try:
                w.conn.send_bytes(messages.encode({"kind": "exit"}))
            except OSError:
                pass
        deadline = time.monotonic() + grace_s
        for w in self.workers:
            if w.exit_code(max(0.0, deadline - time.monotonic())) is None:
                w.process.kill()
                w.process.wait()
            w.conn.close()
        self.workers = []
        self._loaded = None
        self._sent.clear()

    def pids(self) -> list[int]:
        return [w.process.pid for w in self.workers]

    # -- one step ---------------------------------------------------------------------------------------------
    def run_passes(self, latent: torch.Tensor, timestep: torch.Tensor, passes: dict[str, dict],
                   check_interrupt=None) -> dict[str, torch.Tensor]:
        """The predictions of `passes` (`{name: pass arguments}`), run on the workers at once."""
        self.ensure_ready(check_interrupt)
        used = {id(v): v for args in passes.values() for v in args.values() if v is not None}
        new = {key: value for key, value in used.items() if key not in self._sent}
        drop = [key for key in self._sent if key not in used]
        self._sent = used
        refs = {name: {arg: None if v is None else id(v) for arg, v in args.items()} for name, args in passes.items()}
        by_group = [{name: refs[name] for name in self.layout.passes_of(g, refs)} for g in range(self.layout.guidance)]
        request = {"kind": "step", "latent": latent, "timestep": timestep, "new": new, "drop": drop,
                   "passes": by_group, "pace_s": self.pace_s}
        preds = {}
        for reply in self._exchange(request, check_interrupt, "a denoising step"):
            preds.update(reply["preds"])
        return {name: preds[name].to(latent.device) for name in passes}

    # -- messaging --------------------------------------------------------------------------------------------
    def _exchange(self, request: dict, check_interrupt, what: str) -> list[dict]:
        """Send every worker `request` (encoded once) and gather their replies, in rank order."""
        data = messages.encode(request)
        for w in self.workers:
            try:
                w.conn.send_bytes(data)
            except OSError:
                self._fail(w, what)
        replies: dict[int, dict] = {}
        pending = {w.conn: w for w in self.workers}
        while pending:
            for conn in wait(list(pending), timeout=POLL_S):
                w = pending.pop(conn)
                try:
                    replies[w.rank] = messages.decode(conn.recv_bytes())
                except (EOFError, OSError):
                    self._fail(w, what)
            if pending and check_interrupt is not None:
                try:
                    check_interrupt()
                except BaseException:
                    self._stop_step(pending)
                    raise
        errors = [(r, reply) for r, reply in sorted(replies.items()) if reply["kind"] == "error"]
        if errors:
            rank, reply = errors[0]
            log.error("wantalk: multi-GPU worker %d failed during %s:\n%s", rank, what, reply["trace"])
            if self.layout.sequence > 1 or what == "loading":  # peers may be stuck in a collective
                self.stop(FAILED_GRACE_S)
            raise WorkerFailed(f"multi-GPU worker {rank} failed during {what}: {reply['message']}")
        if any(reply["kind"] == "stopped" for reply in replies.values()):
            raise WorkerFailed(f"the multi-GPU workers stopped during {what} without an interrupt from this process")
        return [replies[r] for r in range(len(self.workers))]

    def _fail(self, worker: _Worker, what: str):
        code = worker.exit_code()
        self.stop(FAILED_GRACE_S)
        raise WorkerFailed(f"multi-GPU {worker.describe()} died during {what} (exit code {code}); all workers were "
                           f"stopped, the next run starts them again (and reloads the model).")

    def _stop_step(self, pending: dict) -> None:
        """Interrupt: signal the workers still busy and collect their answers; tear down any that stay silent."""
        for w in pending.values():
            if w.process.poll() is None:
                os.kill(w.process.pid, signal.SIGUSR1)
        deadline = time.monotonic() + STOP_GRACE_S
        lost = 0
        while pending and time.monotonic() < deadline:
            for conn in wait(list(pending), timeout=POLL_S):
                pending.pop(conn)
                try:
                    conn.recv_bytes()
                except (EOFError, OSError):
                    lost += 1
        if pending or lost:
            log.warning("wantalk: %d multi-GPU workers did not stop within %.0fs; stopping the pack",
                        len(pending) + lost, STOP_GRACE_S)
            self.stop(FAILED_GRACE_S)
