"""Shared helpers for the benchmark scripts: import the pack, find the reference key listings, time on the GPU."""
import importlib.util
import json
import os
import re
import sys
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = os.path.join(ROOT, "tests", "data", "keys")


def import_pack(name: str = "wantalk"):
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "__init__.py"),
                                                      submodule_search_locations=[ROOT])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def import_core(name: str = "wantalk") -> None:
    """The pack as a package without running its `__init__` (the node modules): for scripts that need only the
    model or the audio encoders, so that a node module being edited elsewhere cannot stop them."""
    if name not in sys.modules:
        package = types.ModuleType(name)
        package.__path__ = [ROOT]
        sys.modules[name] = package


def reference_shapes(listing: str) -> dict:
    """Key -> shape from one of the official key listings the repository carries (tests/data/keys/*.txt)."""
    path = os.path.join(KEYS, listing)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"key listing {listing} not found in {KEYS}")
    out = {}
    for line in open(path):
        key, shape = line.rstrip("\n").split("\t")[:2]
        out[key] = tuple(int(x) for x in re.findall(r"\d+", shape))
    return out


def random_vae_state_dict(device="cpu", seed: int = 0) -> dict:
    """Wan 2.1 VAE weights with the real shapes: fan-in scaled random weights, norm gammas near 1, small biases."""
    import math
    import torch
    gen = torch.Generator(device=device).manual_seed(seed)

    def random_tensor(key, shape):
        r = torch.randn(shape, device=device, generator=gen)
        if key.endswith("gamma"):
            return 1 + 0.1 * r
        return r / math.prod(shape[1:]) ** 0.5 if len(shape) > 1 else 0.1 * r
    return {k: random_tensor(k, s) for k, s in reference_shapes("keys_vae.txt").items()}


def add_clip_size_args(parser, frames: int = 81, height: int = 480, width: int = 832) -> None:
    """--frames/--height/--width of the video the benchmark runs; default one 81-frame window at the 480p bucket."""
    parser.add_argument("--frames", type=int, default=frames)
    parser.add_argument("--height", type=int, default=height)
    parser.add_argument("--width", type=int, default=width)


def cuda_time(fn, warmup: int = 1, repeats: int = 3) -> list[float]:
    """Seconds per call, measured with CUDA events after warm-up."""
    import torch
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return times


def write_result(name: str, result: dict) -> None:
    print(json.dumps(result))
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, f"{name}.json"), "a") as f:
            f.write(json.dumps(result) + "\n")
