"""Block swap on the CPU: the schedule (which block is where at each step), event ordering, pinned-memory
bookkeeping, and bit-identical outputs with and without swapping (plain, InfiniteTalk two speakers, fp8, fp4)."""
import gc
import random
import weakref

import pytest
import torch

from tiny_models import TINY_I2V, TINY_T2V, random_state_dict, tiny_infinitetalk, tiny_wan
from wantalk.wanvideo import block_swap as bs
from wantalk.wanvideo.loader import assemble_model
from wantalk.wanvideo.memory_plan import MemoryPlanError


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls on a loaded 2-core machine: one thread is ~50x faster than two contending ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CFG5 = TINY_T2V.with_(num_layers=5)  # few tokens and no image branch: the suite runs on 2 busy cores


def inputs(cfg, rng, frames=1, size=8):
    i2v = cfg.in_dim > 16
    return dict(x=torch.randn(1, 16, frames, size, size, generator=rng),
                t=torch.tensor([float(torch.randint(1, 999, (1,), generator=rng))]),
                context=torch.randn(1, 7, cfg.text_dim, generator=rng),
                clip_fea=torch.randn(1, 257, cfg.clip_dim, generator=rng) if i2v else None,
                y=torch.randn(1, cfg.in_dim - 16, frames, size, size, generator=rng) if i2v else None)


def run(model, args, audio=None):
    return model.forward_batched(args["x"], args["t"], args["context"], args["clip_fea"], args["y"], audio=audio)


class FakePinner:
    """Records page-locking (the CPU has none) so the bookkeeping can be checked."""

    def __init__(self):
        self.pinned, self.unpinned = [], []

    def pin(self, arena):
        self.pinned.append((arena.data_ptr(), arena.numel()))
        return True

    def unpin(self, arena):
        self.unpinned.append(arena.data_ptr())


class RecordingTransfer(bs.InlineTransfer):
    """Synchronous copies with token events, logging copy/wait/mark so the ordering can be checked."""

    def __init__(self):
        self.log, self.count = [], 0

    def copy(self, dst, src, after=None):
        dst.copy_(src)
        self.count += 1
        event = ("copied", self.count)
        self.log.append(("copy", dst.data_ptr(), after, event))
        return event

    def wait(self, event):
        self.log.append(("wait", event))

    def mark(self):
        self.count += 1
        event = ("done", self.count)
        self.log.append(("mark", event))
        return event


@pytest.mark.parametrize("n_swap,prefetch", [(1, 1), (3, 0), (4, 2), (5, 1)])
def test_swap_is_bit_identical(rng, n_swap, prefetch):
    model, _ = tiny_wan(CFG5, rng)
    args = [inputs(CFG5, rng) for _ in range(2)]
    reference = [run(model, a) for a in args]
    bs.configure_block_swap(model, n_swap, device="cpu", prefetch=prefetch, pinner=FakePinner())
    for _ in range(2):  # later forwards start from the wrapped-around prefetch
        for a, ref in zip(args, reference):
            assert torch.equal(run(model, a), ref)


def test_infinitetalk_two_speakers_bit_identical(rng):
    model, _ = tiny_infinitetalk(rng)
    args = inputs(TINY_I2V, rng, frames=5)
    audio2 = model.cfg.audio.random_conditioning(model, args["x"].shape[2], speakers=2)
    audio1 = model.cfg.audio.random_conditioning(model, args["x"].shape[2], speakers=1)
    reference = [run(model, args, audio2), run(model, args, audio1)]
    bs.configure_block_swap(model, 1, device="cpu", pinner=FakePinner())
    assert torch.equal(run(model, args, audio2), reference[0])
    assert torch.equal(run(model, args, audio1), reference[1])


@pytest.mark.parametrize("mode", ["fp8_e4m3fn_scaled", "fp8_e5m2", "fp4"])
def test_quantized_blocks_stream_as_stored_bytes(rng, mode):
    plain, _ = tiny_wan(CFG5)
    sd = random_state_dict(plain, rng)
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    model = assemble_model(shapes, lambda k: (sd[k], {}), quantization=mode, base_dtype=torch.float32)
    args = inputs(CFG5, rng)
    reference = run(model, args)
    stored = {n: t.dtype for n, t in bs.module_tensors(model.blocks[4]).items()}
    swapper = bs.configure_block_swap(model, 3, device="cpu", pinner=FakePinner())
    assert {n: t.dtype for n, t in bs.module_tensors(model.blocks[4]).items()} == stored  # not dequantized
    assert swapper.host_bytes() == sum(bs.block_layout(model.blocks[i]).nbytes for i in (2, 3, 4))
    assert torch.equal(run(model, args), reference)


def test_schedule_places_blocks_and_orders_copies(rng):
    """At every step: resident blocks stay, the running streamed block sits in slot visit % K, the next K-1
    streamed blocks are already copied; a copy into a slot waits for the compute of its previous occupant."""
    model, _ = tiny_wan(CFG5, rng)
    transfer = RecordingTransfer()
    slots = 2
    swapper = bs.configure_block_swap(model, 3, device="cpu", prefetch=slots - 1, pinner=FakePinner(),
                                      transfer=transfer)
    seen = []
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda mod, a, i=i: seen.append((i, swapper.placement())))
    args = inputs(CFG5, rng)
    for _ in range(3):
        run(model, args)
    streamed = [2, 3, 4]
    visit = 0
    for index, placement in seen:
        assert all(placement[r] == "resident" for r in (0, 1))
        if index in streamed:
            assert placement[index] == f"slot {visit % slots}"
            ahead = streamed[(streamed.index(index) + 1) % 3]
            assert placement[ahead] == f"slot {(visit + 1) % slots}"  # prefetched before this block runs
            visit += 1
    assert visit == 9
    # Ordering: each copy into a slot after its first waits on the mark recorded after its last user ran.
    slot_ptrs = [b.data_ptr() for b in swapper.slot_buffers]
    first_copy = next(i for i, e in enumerate(transfer.log) if e[0] == "copy")
    initial = [e[1] for e in transfer.log[:first_copy] if e[0] == "mark"]
    assert len(initial) == slots  # fresh slots: first copies wait for the compute queued before them
    last_mark = dict(enumerate(initial))
    users = {}  # slot -> pending ready event
    for entry in transfer.log[first_copy:]:
        if entry[0] == "copy":
            slot = slot_ptrs.index(entry[1])
            assert entry[2] == last_mark.get(slot)
            users[slot] = entry[3]
        elif entry[0] == "wait":
            slot = next(s for s, e in users.items() if e == entry[1])
        elif entry[0] == "mark":
            last_mark[slot] = entry[1]
    copies = sum(1 for e in transfer.log if e[0] == "copy")
    assert copies == 3 * 3 + 2  # every visit copies (N > K), plus the wrap-around prefetch of the next forward


def test_streamed_blocks_fitting_in_slots_are_copied_once(rng):
    model, _ = tiny_wan(CFG5, rng)
    transfer = RecordingTransfer()
    bs.configure_block_swap(model, 2, device="cpu", prefetch=3, pinner=FakePinner(), transfer=transfer)
    args = inputs(CFG5, rng)
    for _ in range(3):
        run(model, args)
    assert sum(1 for e in transfer.log if e[0] == "copy") == 2


def test_pinned_bookkeeping_and_no_duplicates(rng):
    model, _ = tiny_wan(CFG5, rng)
    pinner = FakePinner()
    original = weakref.ref(model.blocks[4].ffn[0].weight)
    swapper = bs.configure_block_swap(model, 3, device="cpu", pinner=pinner)
    gc.collect()
    assert original() is None  # the pageable original was released: host RAM holds each block once
    sizes = {i: bs.block_layout(model.blocks[i]).nbytes for i in (2, 3, 4)}
    assert sorted(n for _, n in pinner.pinned) == sorted(sizes.values())
    assert swapper.pinned_bytes() == sum(sizes.values())
    for i in (2, 3, 4):
        arena = swapper.host[i].arena
        lo, hi = arena.data_ptr(), arena.data_ptr() + arena.numel()
        assert all(lo <= t.data_ptr() < hi for t in bs.module_tensors(model.blocks[i]).values())
    args = inputs(CFG5, rng)
    reference = run(model, args)
    for n in (1, 4):  # reconfiguring reuses the arenas: nothing is pinned twice
        again = bs.configure_block_swap(model, n, device="cpu", pinner=pinner)
        assert again is swapper and swapper.blocks_to_swap == n
        assert torch.equal(run(model, args), reference)
    assert len(pinner.pinned) == 4  # block 1 was packed once when it first streamed
    bs.remove_block_swap(model)
    assert model.block_runner is None
    assert torch.equal(run(model, args), reference)
    del swapper, again
    gc.collect()
    assert sorted(pinner.unpinned) == sorted(p for p, _ in pinner.pinned)  # unregistered before being freed


def test_release_vram_and_restore(rng):
    model, _ = tiny_infinitetalk(rng)
    args = inputs(TINY_I2V, rng, frames=5)
    audio = model.cfg.audio.random_conditioning(model, args["x"].shape[2])
    reference = run(model, args, audio)
    swapper = bs.configure_block_swap(model, 1, device="cpu", pinner=FakePinner())
    assert torch.equal(run(model, args, audio), reference)
    freed = bs.release_vram(model)
    assert freed == sum(b.numel() for b in swapper.slot_buffers) or freed > 0
    assert swapper.slot_buffers == [] and swapper.placement()[1] == "host"
    assert torch.equal(run(model, args, audio), reference)
    assert bs.release_vram(tiny_wan(CFG5)[0]) == 0


def test_interrupted_forward_recovers(rng):
    model, _ = tiny_wan(CFG5, rng)
    bs.configure_block_swap(model, 4, device="cpu", prefetch=1, pinner=FakePinner())
    args = inputs(CFG5, rng)
    reference = run(model, args)
    stop_at = random.choice([2, 3, 4])

    def cancel(module, a):
        raise KeyboardInterrupt

    handle = model.blocks[stop_at].register_forward_pre_hook(cancel)
    with pytest.raises(KeyboardInterrupt):
        run(model, args)
    handle.remove()
    assert torch.equal(run(model, args), reference)
    assert torch.equal(run(model, args), reference)


def test_auto_uses_the_plan_and_refuses_what_cannot_fit(rng):
    model, _ = tiny_wan(CFG5, rng)
    args = inputs(CFG5, rng)
    reference = run(model, args)
    from wantalk.wanvideo import memory_plan as mp
    sizes = mp.ModelBytes.of(model)
    run_settings = mp.RunSettings(4 * 4, audio=False, fused=False)
    budget = mp.plan_memory(CFG5, sizes, run_settings, blocks_to_swap=3).peak
    swapper = bs.configure_block_swap(model, -1, device="cpu", pinner=FakePinner(), available_bytes=lambda: budget)
    assert torch.equal(run(model, args), reference)
    assert swapper.blocks_to_swap == 3 and swapper.plan.peak <= budget
    too_small = mp.plan_memory(CFG5, sizes, run_settings, blocks_to_swap=5).peak - 1
    swapper.available_bytes = lambda: too_small
    swapper.plan_key = None
    with pytest.raises(MemoryPlanError, match="smaller quantization"):
        run(model, args)


def test_bad_settings_and_unmovable_tensors(rng):
    model, _ = tiny_wan(CFG5, rng)
    with pytest.raises(ValueError, match="blocks_to_swap"):
        bs.configure_block_swap(model, -2, device="cpu")
    with pytest.raises(ValueError, match="prefetch"):
        bs.configure_block_swap(model, 1, device="cpu", prefetch=-1)
    model.blocks[4].ffn[0].stray = torch.ones(3)
    with pytest.raises(RuntimeError, match="plain attribute"):
        bs.configure_block_swap(model, 1, device="cpu", pinner=FakePinner())


def test_node_is_registered_and_names_what_it_needs(rng):
    from wantalk import nodes
    node = nodes.NODE_CLASS_MAPPINGS["WanTalkBlockSwap"]()
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["WanTalkBlockSwap"] == "WanTalk Block Swap"
    if torch.cuda.is_available():
        pytest.skip("the refusal is for machines without CUDA")
    model, _ = tiny_wan(CFG5, rng)
    with pytest.raises(ValueError, match="CUDA GPU"):
        node.configure(model, -1, 1)


@pytest.mark.gpu
@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_cuda_streams_are_bit_identical_and_pinned(rng, prefetch):
    """On the GPU: real page-locking, the side copy stream and events. Blocks big enough that copies take real
    time, several forwards in a row: a missing wait would show as a wrong output."""
    cfg = TINY_T2V.with_(dim=1024, ffn_dim=4096, num_heads=8, num_layers=8)
    model, _ = tiny_wan(cfg, rng, dtype=torch.bfloat16)
    args = inputs(cfg, rng, frames=9, size=32)
    cuda_args = {k: (v.cuda() if v is not None else None) for k, v in args.items()}
    model.cuda()
    reference = run(model, cuda_args)
    model.cpu()
    swapper = bs.configure_block_swap(model, 6, device="cuda", prefetch=prefetch)
    assert swapper.pinned_bytes() == swapper.host_bytes() > 0
    assert all(swapper.host[i].arena.is_pinned() for i in swapper.streamed)
    for _ in range(4):
        assert torch.equal(run(model, cuda_args), reference)
    assert bs.release_vram(model) > 0
    assert torch.equal(run(model, cuda_args), reference)


def test_swapped_model_is_planned_before_sampling(rng):
    """memory_plan.check_before_sampling plans a block-swapped model up front: a run too large is refused before
    the model's input stage allocates anything (a 720p 161-frame run on 8 GB died there, issue 15), and an
    accepted one has its blocks placed and its plan kept for the first forward."""
    from wantalk.wanvideo import memory_plan as mp
    model, _ = tiny_wan(CFG5, rng)
    ran = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda mod, a: ran.append(mod))
    budget = {"bytes": 1}
    swapper = bs.configure_block_swap(model, -1, device="cpu", pinner=FakePinner(),
                                      available_bytes=lambda: budget["bytes"])
    run_settings = mp.RunSettings(tokens=16, audio=False, fused=False)  # the CPU runs the torch stages
    with pytest.raises(MemoryPlanError, match="needs about"):
        mp.check_before_sampling(model, run_settings)
    assert ran == [] and swapper.plan is None
    sizes = mp.ModelBytes.of(model)
    budget["bytes"] = mp.plan_memory(model.cfg, sizes, run_settings, blocks_to_swap=3).peak  # 2 slots: saves 1
    mp.check_before_sampling(model, run_settings)
    assert swapper.blocks_to_swap == 3 and swapper.plan.tokens == 16 and ran == []
    planned = swapper.plan
    args = inputs(CFG5, rng, size=8)
    run(model, args)  # 1 frame of 8x8 latents: 16 tokens, the planned shape
    assert swapper.plan is planned and len(ran) == CFG5.num_layers
