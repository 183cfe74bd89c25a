"""Block swap: run a Wan model whose weights do not fit in VRAM, at (nearly) full speed.

The last N transformer blocks live in page-locked host memory, each packed once into one host arena (its
tensors, quantized bytes as they are, at fixed offsets). Just before a streamed block runs, its arena is copied
into one of a few fixed GPU slots by ONE asynchronous copy on a separate CUDA stream, issued `prefetch` blocks
ahead so the transfer overlaps the compute of earlier blocks; CUDA events order copy-before-use and
use-before-overwrite. The block then runs on views of the slot (`torch.func.functional_call`), so nothing is
ever copied back and nothing is allocated per step: host memory holds the model once, VRAM holds the resident
blocks plus the slots.

Resident blocks whose weights came from the host keep their host arena too, so `release_vram` can drop them
before a VAE decode for free; they come back at the next forward. `blocks_to_swap=-1` (auto) picks N at the
first forward from the free VRAM and the token count (`memory_plan`), and the plan is checked (with a clear
message naming what to change) before any block runs.
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
from torch.func import functional_call

from . import memory_plan

log = logging.getLogger("wantalk")

ALIGN = 256  # byte alignment of every tensor inside an arena or slot (kernels want aligned operands)
AUTO = -1


# ----------------------------------------------------------------------------------------------
# Packing a block's tensors into one flat byte buffer
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    name: str
    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class Layout:
    """Where each parameter/buffer of a module sits in its flat byte buffer."""
    entries: tuple[Entry, ...]
    nbytes: int


def module_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def block_layout(module: nn.Module) -> Layout:
    """The packed layout of `module`'s tensors (works on the meta device: only shapes and dtypes are read)."""
    entries, offset = [], 0
    for name, t in module_tensors(module).items():
        entry = Entry(name, offset, tuple(t.shape), t.dtype)
        entries.append(entry)
        offset += -(-entry.nbytes // ALIGN) * ALIGN
    return Layout(tuple(entries), offset)


def views(buffer: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
    """Typed views of a uint8 `buffer` laid out as `layout` (no copies)."""
    out = {}
    for e in layout.entries:
        out[e.name] = buffer[e.offset:e.offset + e.nbytes].view(e.dtype).view(e.shape)
    return out


def point_module_at(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Make `module`'s parameters/buffers the given tensors (the previous storage is released)."""
    for name, t in tensors.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(t, requires_grad=False)
        else:
            owner._buffers[leaf] = t


def _check_movable(module: nn.Module, where: str) -> None:
    """Tensors kept as plain attributes would not travel with the block: refuse rather than compute wrongly."""
    for name, sub in module.named_modules():
        registered = set(sub._parameters) | set(sub._buffers)
        for attr, value in vars(sub).items():
            if isinstance(value, torch.Tensor) and attr not in registered and not value.is_meta:
                raise RuntimeError(f"block swap cannot move {where}{'.' + name if name else ''}.{attr}: a tensor "
                                   f"stored as a plain attribute; register it as a buffer.")


# ----------------------------------------------------------------------------------------------
# Host memory: page-locked once, in place
# ----------------------------------------------------------------------------------------------

class HostPinner:
    """Page-locks host arenas in place with cudaHostRegister: exact size, no copy (torch's pinned allocator rounds
    every allocation up to a power of two and caches it, which is how block swap exhausts host RAM)."""

    def __init__(self):
        self.available = torch.cuda.is_available()
        self.failed_once = False

    def pin(self, arena: torch.Tensor) -> bool:
        if not self.available or arena.numel() == 0:
            return False
        try:
            err = torch.cuda.cudart().cudaHostRegister(arena.data_ptr(), arena.numel(), 0)
            code = int(getattr(err, "value", err))
        except (AttributeError, RuntimeError, TypeError) as exc:  # a torch build without the binding
            err, code = exc, -1
        if code != 0:
            if not self.failed_once:
                self.failed_once = True
                log.warning("wantalk: could not page-lock %.0f MiB of host memory (CUDA error %s); block swap "
                            "copies will not overlap compute. Free host RAM or swap fewer blocks.",
                            arena.numel() / 2**20, err)
            return False
        return True

    def unpin(self, arena: torch.Tensor) -> None:
        try:
            torch.cuda.cudart().cudaHostUnregister(arena.data_ptr())
        except Exception:  # interpreter shutdown: CUDA may already be gone; the process frees the pages anyway
            pass


class HostCopy:
    """One block's tensors in one host arena. The block's parameters point into the arena; the arena is
    unregistered (never freed while registered) when this copy is collected."""

    def __init__(self, block: nn.Module, pinner: HostPinner):
        self.layout = block_layout(block)
        self.arena = torch.empty(self.layout.nbytes, dtype=torch.uint8)
        host_views = views(self.arena, self.layout)
        for name, t in module_tensors(block).items():
            host_views[name].copy_(t)
        point_module_at(block, host_views)  # the block's former storage (host or GPU) is released here
        self.pinned = pinner.pin(self.arena)
        if self.pinned:
            weakref.finalize(self, pinner.unpin, self.arena)

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes


# ----------------------------------------------------------------------------------------------
# Transfers: CUDA stream + events, or inline (CPU, tests)
# ----------------------------------------------------------------------------------------------

class InlineTransfer:
    """Synchronous copies with no events: the CPU path, and the reference the CUDA path must match."""

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after=None):
        dst.copy_(src)

    def wait(self, event) -> None:
        pass

    def mark(self):
        return None

    def synchronize(self) -> None:
        pass


class CudaTransfer:
    """Host-to-device copies on their own stream; events order them against the compute stream."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after=None):
        with torch.cuda.stream(self.stream):
            if after is not None:
                self.stream.wait_event(after)
            dst.copy_(src, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        return done

    def wait(self, event) -> None:
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def mark(self):
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def synchronize(self) -> None:
        self.stream.synchronize()


# ----------------------------------------------------------------------------------------------
# The slot schedule (pure bookkeeping, testable without a GPU)
# ----------------------------------------------------------------------------------------------

class SlotSchedule:
    """Streamed blocks are visited in a fixed cyclic order (every forward runs them in order); visit v uses slot
    v % K. A visit's copy may be issued once visit v - K has run (its slot is free), so while visit v computes,
    the copies of v+1 .. v+K-1 are in flight. Slots remember which block they hold: when every streamed block
    has its own slot (N <= K) nothing is copied after the first forward."""

    def __init__(self, order: list[int], slots: int):
        self.order = list(order)
        self.slots = max(1, min(slots, len(order))) if order else 0
        self.holder: list[int | None] = [None] * self.slots
        self.next_visit = 0
        self.issued = 0

    def block_of(self, visit: int) -> int:
        return self.order[visit % len(self.order)]

    def slot_of(self, visit: int) -> int:
        return visit % self.slots

    def restart_if_needed(self, block: int) -> None:
        """After an interrupted forward, restart the visit count at `block` (slot contents stay valid)."""
        if self.order and self.block_of(self.next_visit) != block:
            self.next_visit = self.issued = self.order.index(block)

    def to_issue(self, upto: int) -> list[tuple[int, int, int, bool]]:
        """Visits up to `upto` not yet issued, as (visit, block, slot, needs_copy); marks them issued."""
        out = []
        while self.issued <= upto:
            v = self.issued
            block, slot = self.block_of(v), self.slot_of(v)
            out.append((v, block, slot, self.holder[slot] != block))
            self.holder[slot] = block
            self.issued += 1
        return out


# ----------------------------------------------------------------------------------------------
# The swapper: the model's block_runner
# ----------------------------------------------------------------------------------------------

class BlockSwapper:
    """`model.block_runner`: runs resident blocks as they are, streamed blocks from the GPU slots.

    blocks_to_swap: N >= 0 (the last N blocks stream) or -1 (auto, chosen at the first forward of each token
    count). prefetch: how many streamed blocks are copied ahead of the running one (slots = prefetch + 1).
    make_room(bytes): asks the host (ComfyUI) to unload other models before the plan is checked.
    """

    def __init__(self, model: nn.Module, *, device, blocks_to_swap: int = AUTO, prefetch: int = 1,
                 make_room: Callable[[int], None] | None = None, transfer=None, pinner: HostPinner | None = None,
                 available_bytes: Callable[[], int] | None = None):
        if blocks_to_swap < AUTO:
            raise ValueError(f"blocks_to_swap must be -1 (auto) or 0..{len(model.blocks)}, got {blocks_to_swap}")
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0 (blocks copied ahead of the running one), got {prefetch}")
        self.device = torch.device(device)
        self.num_blocks = len(model.blocks)
        self.requested = blocks_to_swap if blocks_to_swap == AUTO else min(blocks_to_swap, self.num_blocks)
        self.prefetch = prefetch
        self.make_room = make_room
        self.transfer = transfer or (CudaTransfer(self.device) if self.device.type == "cuda" else InlineTransfer())
        self.pinner = pinner or HostPinner()
        # The VRAM budget of this model's run: what is free plus what the plan counts and we already hold.
        self.available_bytes = available_bytes or (lambda: memory_plan.available_vram(self.device) + self._held())
        self.model_ref = weakref.ref(model)
        self.host: dict[int, HostCopy] = {}
        self.gpu: dict[int, torch.Tensor] = {}      # resident blocks' own GPU buffers (blocks that have a HostCopy)
        self.streamed: list[int] = []
        self.schedule = SlotSchedule([], 0)
        self.slot_buffers: list[torch.Tensor] = []
        self.slot_views: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self.ready: dict[int, object] = {}          # slot -> event: copy into it finished
        self.free: dict[int, object] = {}           # slot -> event: compute with it finished
        self.plan_key: tuple[int, int] | None = None
        self.planned_run: memory_plan.RunSettings | None = None
        self.plan: memory_plan.MemoryPlan | None = None
        self.offloaded = False
        self.arranged = False
        self.allocator()  # before the slots and resident blocks are allocated
        self._move_rest(model)
        if self.requested != AUTO:
            self._arrange(model, self.requested)

    # -- placement --------------------------------------------------------------------------------
    def _move_rest(self, model: nn.Module) -> None:
        """Everything but the blocks is small and always resident."""
        for name, child in model.named_children():
            if name != "blocks":
                child.to(self.device)

    def _on_device(self, block: nn.Module) -> bool:
        return all(t.device == self.device for t in module_tensors(block).values())

    def _arrange(self, model: nn.Module, n_swap: int) -> None:
        """Stream the last `n_swap` blocks, make the others resident; reuses existing host copies and slots."""
        self._drain()
        keep = self.num_blocks - n_swap
        for i, block in enumerate(model.blocks):
            if i not in self.host and (i >= keep or not self._on_device(block)):
                # Blocks on the host are packed whether or not they stream: host RAM already holds them, and the
                # arena lets release_vram and a new plan move them without copying anything back.
                _check_movable(block, f"blocks.{i}")
                self.host[i] = HostCopy(block, self.pinner)
            if i >= keep and i in self.gpu:
                point_module_at(block, views(self.host[i].arena, self.host[i].layout))
                del self.gpu[i]
            elif i < keep and i in self.host:
                self._promote(i, block)
        self.streamed = list(range(keep, self.num_blocks))
        self._make_slots()
        self.offloaded = False
        self.arranged = True

    def _promote(self, index: int, block: nn.Module) -> None:
        if index in self.gpu:
            return
        copy = self.host[index]
        buffer = torch.empty(copy.nbytes, dtype=torch.uint8, device=self.device)
        buffer.copy_(copy.arena, non_blocking=copy.pinned)
        self.gpu[index] = buffer
        point_module_at(block, views(buffer, copy.layout))

    def _make_slots(self) -> None:
        slots = min(self.prefetch + 1, len(self.streamed))
        size = max((self.host[i].nbytes for i in self.streamed), default=0)
        if len(self.slot_buffers) != slots or (self.slot_buffers and self.slot_buffers[0].numel() < size):
            self.slot_buffers = [torch.empty(size, dtype=torch.uint8, device=self.device) for _ in range(slots)]
        self.schedule = SlotSchedule(self.streamed, slots)
        self.slot_views.clear()
        self.ready.clear()
        # The slots' memory may have been another tensor's, still in use by queued compute: first copies wait.
        self.free = {k: self.transfer.mark() for k in range(slots)}

    def _drain(self) -> None:
        """Wait for copies in flight (before slots or arenas change)."""
        self.transfer.synchronize()

    # -- bookkeeping visible to tests and reports -------------------------------------------------
    @property
    def blocks_to_swap(self) -> int:
        return len(self.streamed)

    def placement(self) -> dict[int, str]:
        """Where each block's weights live now: 'resident', 'host' (streamed, not in a slot) or 'slot k'."""
        out = {}
        for i in range(self.num_blocks):
            if i in self.streamed:
                slots = [k for k, b in enumerate(self.schedule.holder) if b == i]
                out[i] = f"slot {slots[0]}" if slots else "host"
            else:
                out[i] = "host" if self.offloaded and i in self.host else "resident"
        return out

    def pinned_bytes(self) -> int:
        return sum(c.nbytes for c in self.host.values() if c.pinned)

    def host_bytes(self) -> int:
        return sum(c.nbytes for c in self.host.values())

    def gpu_bytes(self) -> int:
        """Weights this swapper holds on the GPU: resident blocks it promoted plus the slots."""
        return sum(b.numel() for b in self.gpu.values()) + sum(b.numel() for b in self.slot_buffers)

    # -- VRAM release (before a VAE decode) -------------------------------------------------------
    def release_vram(self) -> int:
        """Drop the GPU copies of resident blocks that have a host arena and the slots; returns bytes freed.
        They come back at the next forward."""
        model = self.model_ref()
        self._drain()
        freed = self.gpu_bytes()
        for i in list(self.gpu):
            point_module_at(model.blocks[i], views(self.host[i].arena, self.host[i].layout))
        self.gpu.clear()
        self.slot_buffers = []
        self.schedule = SlotSchedule([], 0)
        self.slot_views.clear()
        self.offloaded = True
        return freed

    def _restore(self, model: nn.Module) -> None:
        for i in range(self.num_blocks):
            if i not in self.streamed and i in self.host:
                self._promote(i, model.blocks[i])
        self._make_slots()
        self.offloaded = False

    # -- planning ---------------------------------------------------------------------------------
    def _plan_for(self, model: nn.Module, x: torch.Tensor, inputs) -> None:
        """At the first forward of a shape: choose N (auto) and check the plan fits, before any block runs."""
        audio = getattr(inputs, "audio", None)
        self.plan_run(model, memory_plan.RunSettings(tokens=x.shape[1], batch=x.shape[0], audio=audio is not None,
                                                     two_speakers=bool(getattr(audio, "needs_qk", False)),
                                                     fused=memory_plan.fused_stages(x.device)))

    def plan_run(self, model: nn.Module, run: memory_plan.RunSettings,
                 decode: memory_plan.DecodeSettings | None = None) -> None:
        """Choose N (auto), check the plan fits (MemoryPlanError naming what to change) and place the blocks.

        Called by `memory_plan.check_before_sampling` before a run, so that a refusal comes before the model's
        input stage allocates its first `[tokens, dim]` tensors, and again at block 0 of each forward (a no-op
        for a shape already planned). Two-speaker passes need more than one-speaker ones; the plan only ever
        grows within a shape."""
        key = (run.tokens, run.batch)
        if self.plan_key == key and (self.planned_run.two_speakers or not run.two_speakers) and \
                (self.planned_run.audio or not run.audio):
            return
        if self.plan_key == key:
            run = memory_plan.RunSettings(run.tokens, run.batch, run.audio or self.planned_run.audio,
                                          run.two_speakers or self.planned_run.two_speakers, run.fused)
        sizes = memory_plan.ModelBytes.of(model)
        cfg = model.cfg
        how = {"prefetch": self.prefetch, "allocator": self.allocator(), "decode": decode}
        if self.make_room is not None:
            wish = 0 if self.requested == AUTO else self.requested
            need = memory_plan.plan_memory(cfg, sizes, run, blocks_to_swap=wish, **how).peak
            self.make_room(max(0, need - self._held()))
        available = self.available_bytes()
        fits = memory_plan.fitting_swap(cfg, sizes, run, available, **how)
        n = (fits if fits is not None else self.num_blocks) if self.requested == AUTO else self.requested
        plan = memory_plan.plan_memory(cfg, sizes, run, blocks_to_swap=n, **how)
        plan.check(available, fits_with_swap=fits)
        if not self.arranged or n != len(self.streamed):
            self._arrange(model, n)
        log.info("wantalk: block swap streams %d of %d blocks; %s", n, self.num_blocks, plan.summary())
        self.plan, self.plan_key, self.planned_run = plan, key, run

    def allocator(self) -> memory_plan.Allocator:
        """The CUDA allocator the plan assumes (expandable segments turned on where possible, before the first
        slot or block is allocated); the CPU has none to plan for."""
        if self.device.type != "cuda":
            return memory_plan.Allocator()
        return memory_plan.use_expandable_segments()

    def _held(self) -> int:
        """Device bytes the plan counts that are allocated already: the non-block weights, promoted blocks and
        slots, and blocks that were loaded on the device."""
        model = self.model_ref()
        other = sum(memory_plan.tensor_bytes(c) for name, c in model.named_children() if name != "blocks")
        loaded = sum(memory_plan.tensor_bytes(model.blocks[i]) for i in range(self.num_blocks)
                     if i not in self.host and self._on_device(model.blocks[i]))
        return self.gpu_bytes() + other + loaded

    # -- running ----------------------------------------------------------------------------------
    def _issue(self, upto: int) -> None:
        for _visit, block, slot, needs_copy in self.schedule.to_issue(upto):
            copy = self.host[block]
            if needs_copy:
                dst = self.slot_buffers[slot][:copy.nbytes]
                self.ready[slot] = self.transfer.copy(dst, copy.arena, after=self.free.get(slot))
            if (slot, block) not in self.slot_views:
                self.slot_views[(slot, block)] = views(self.slot_buffers[slot], copy.layout)

    def __call__(self, index: int, block: nn.Module, x: torch.Tensor, inputs) -> torch.Tensor:
        sched = self.schedule
        if index == 0:
            model = self.model_ref()
            self._plan_for(model, x, inputs)
            if self.offloaded:
                self._restore(model)
            sched = self.schedule
            if sched.slots:
                sched.restart_if_needed(self.streamed[0])
                self._issue(sched.next_visit + sched.slots - 1)  # these copies overlap the resident blocks
        if not sched.slots or index < self.streamed[0]:
            return block(x, inputs)
        sched.restart_if_needed(index)
        visit = sched.next_visit
        self._issue(visit + sched.slots - 1)
        slot = sched.slot_of(visit)
        self.transfer.wait(self.ready.get(slot))
        out = functional_call(block, self.slot_views[(slot, index)], (x, inputs))
        self.free[slot] = self.transfer.mark()
        sched.next_visit = visit + 1
        self._issue(visit + sched.slots)  # the next block for this slot (wraps to the next forward)
        return out


# ----------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------

def configure_block_swap(model: nn.Module, blocks_to_swap: int = AUTO, *, device, prefetch: int = 1,
                         make_room: Callable[[int], None] | None = None, **kwargs) -> BlockSwapper:
    """Set up (or re-set up) block swap on `model` in place and return the swapper.

    Re-running with other settings reuses the host arenas already made, so weights are never duplicated."""
    current = model.block_runner
    if isinstance(current, BlockSwapper) and current.device == torch.device(device):
        if blocks_to_swap < AUTO:
            raise ValueError(f"blocks_to_swap must be -1 (auto) or 0..{current.num_blocks}, got {blocks_to_swap}")
        current.prefetch, current.make_room = prefetch, make_room
        if kwargs.get("available_bytes") is not None:
            current.available_bytes = kwargs["available_bytes"]
        current.requested = blocks_to_swap if blocks_to_swap == AUTO else min(blocks_to_swap, current.num_blocks)
        current.plan_key = None
        if current.requested != AUTO:
            current._arrange(model, current.requested)
        return current
    if isinstance(current, BlockSwapper):
        remove_block_swap(model)
    swapper = BlockSwapper(model, device=device, blocks_to_swap=blocks_to_swap, prefetch=prefetch,
                           make_room=make_room, **kwargs)
    model.block_runner = swapper
    return swapper


def remove_block_swap(model: nn.Module, device=None) -> None:
    """Make every block a plain module again on `device` (default: the swapper's device)."""
    swapper = model.block_runner
    if not isinstance(swapper, BlockSwapper):
        return
    swapper._drain()
    target = torch.device(device) if device is not None else swapper.device
    for block in model.blocks:
        block.to(target)
    model.block_runner = None


def release_vram(model: nn.Module) -> int:
    """Before a VAE decode: drop the GPU copies the swapper can restore for free; bytes freed (0 without swap)."""
    swapper = getattr(model, "block_runner", None)
    return swapper.release_vram() if isinstance(swapper, BlockSwapper) else 0
