"""Make the repository importable as the package `wantalk` (it is a ComfyUI node folder, not an installed
package), and provide shared fixtures."""
import contextlib
import importlib.util
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Official key listings at real size (test data shipped with the repository, tests/data/keys/README.md).
KEYS_DIR = os.path.join(ROOT, "tests", "data", "keys")


def _register_package(name: str = "wantalk"):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "__init__.py"),
                                                  submodule_search_locations=[ROOT])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_register_package()
# Test models are tiny: one thread avoids thread start-up and contention costs that dominate at these sizes.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture
def rng():
    """A fresh, unseeded generator per test: inputs differ on every run (tests must hold for any input)."""
    g = torch.Generator()
    g.seed()
    return g


@pytest.fixture
def keys_dir():
    return KEYS_DIR


@pytest.fixture
def use_models_root():
    """`use_models_root(folder)`: outside ComfyUI the pack reads its model folders from `folder`/<kind> until the
    test ends (host.using_models_root)."""
    from wantalk import host
    with contextlib.ExitStack() as stack:
        yield lambda folder: stack.enter_context(host.using_models_root(folder))


@pytest.fixture
def progress_bars(monkeypatch):
    """The host.ProgressBar objects the code under test opens, in order, each with its `total` and `current`."""
    from wantalk import host
    bars = []

    class Bar:
        def __init__(self, total):
            self.total, self.current = total, 0
            bars.append(self)

        def update(self, n=1, preview=None):
            self.current += n

    monkeypatch.setattr(host, "ProgressBar", Bar)
    return bars
