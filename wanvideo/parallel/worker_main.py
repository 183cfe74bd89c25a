"""Entry point of a multi-GPU worker process: `python worker_main.py <fd> <rank> <world> <device> <port>`.

The node folder is imported as the package `wantalk` without running its `__init__` (no ComfyUI nodes in the
workers), then `wanvideo.parallel.worker.main` serves requests on the inherited socket `fd`."""
import os
import sys
import types

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":
    package = types.ModuleType("wantalk")
    package.__path__ = [ROOT]
    sys.modules["wantalk"] = package
    from wantalk.wanvideo.parallel.worker import main  # noqa: E402
    fd, rank, world, device, port = sys.argv[1:6]
    main(int(fd), int(rank), int(world), device, int(port))
    # Exit at once: the interpreter's shutdown (library atexit hooks, helper threads) takes seconds here.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
