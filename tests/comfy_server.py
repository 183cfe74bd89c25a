"""A real ComfyUI server for the tests: started on 127.0.0.1 with a fresh base directory holding the pack as
`custom_nodes/wantalk`, driven through its HTTP API (/prompt, /history, /view), and stopped. Standard library only.

    COMFYUI_DIR=<ComfyUI source folder> python -m pytest tests/test_comfyui.py

COMFYUI_DIR is the folder with ComfyUI's main.py. The server's interpreter is COMFY_PYTHON when set, else the first
of `venv/bin/python` or `.venv/bin/python` inside COMFYUI_DIR or `venv/bin/python` beside it (ComfyUI's usual
install layouts), else the interpreter running the tests. Everything the server writes (models, input, output,
user, database, log) goes to the base directory, so the ComfyUI tree stays untouched.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

PACK_NAME = "wantalk"  # the folder users clone into custom_nodes/, hence the module name ComfyUI gives the pack
FIRST_PORT = 8197


class ComfyError(RuntimeError):
    """The server refused a prompt, failed running it, or did not answer in time."""


def comfyui_dir() -> str | None:
    return os.environ.get("COMFYUI_DIR") or None


def comfy_python(comfy_dir: str) -> str:
    """The interpreter for ComfyUI (see the module docstring for the order)."""
    if os.environ.get("COMFY_PYTHON"):
        return os.environ["COMFY_PYTHON"]
    for venv in (os.path.join(comfy_dir, "venv"), os.path.join(comfy_dir, ".venv"),
                 os.path.join(os.path.dirname(os.path.abspath(comfy_dir)), "venv")):
        candidate = os.path.join(venv, "bin", "python")
        if os.access(candidate, os.X_OK):
            return candidate
    return sys.executable


def free_port(first: int = FIRST_PORT) -> int:
    """The first port from `first` on that nobody listens on or holds (bindable on 127.0.0.1)."""
    for port in range(first, first + 200):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as the server binds: TIME_WAIT is free
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise ComfyError(f"no free port in {first}..{first + 199}")


class ComfyServer:
    """One ComfyUI process; use as a context manager (always stopped)."""

    def __init__(self, comfy_dir: str, pack_dir: str, *, base_dir: str | None = None, python: str | None = None,
                 cpu: bool = True, extra_args=("--cache-none", "--disable-api-nodes"), start_timeout: float = 180):
        self.comfy_dir = os.path.abspath(comfy_dir)
        self.pack_dir = os.path.abspath(pack_dir)
        self.base_dir = os.path.realpath(base_dir or tempfile.mkdtemp(prefix="wantalk-comfy-"))
        self.python = python or comfy_python(self.comfy_dir)
        self.cpu, self.extra_args, self.start_timeout = cpu, list(extra_args), start_timeout
        self.process = None
        self.port = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> str:
        return os.path.join(self.base_dir, "server.log")

    def pack_path(self) -> str:
        """Where the server sees the pack (its custom_nodes/ entry)."""
        return os.path.join(self.base_dir, "custom_nodes", PACK_NAME)

    def start(self) -> "ComfyServer":
        if not os.path.isfile(os.path.join(self.comfy_dir, "main.py")):
            raise ComfyError(f"{self.comfy_dir} has no main.py: COMFYUI_DIR must be the ComfyUI source folder")
        for folder in ("custom_nodes", "models", "input", "output", "temp", "user"):
            os.makedirs(os.path.join(self.base_dir, folder), exist_ok=True)
        if not os.path.lexists(self.pack_path()):
            os.symlink(self.pack_dir, self.pack_path())
        self.port = free_port()
        command = [self.python, os.path.join(self.comfy_dir, "main.py"), "--listen", "127.0.0.1",
                   "--port", str(self.port), "--disable-auto-launch", "--base-directory", self.base_dir,
                   "--database-url", f"sqlite:///{self.base_dir}/comfyui.db"] + (["--cpu"] if self.cpu else [])
        with open(self.log_path, "wb") as log:
            # cwd = base dir: newer ComfyUI writes comfyui_detail.log into its working directory
            self.process = subprocess.Popen(command + self.extra_args, cwd=self.base_dir, stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.process.poll() is not None:
                raise ComfyError(f"ComfyUI ({self.python}) exited with {self.process.returncode} while starting:\n"
                                 + self.log()[-4000:])
            try:
                self.get("/system_stats", timeout=2)
                return self
            except (OSError, ComfyError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise ComfyError(f"ComfyUI did not answer within {self.start_timeout:.0f} s:\n" + self.log()[-4000:])
            time.sleep(0.5)

    def stop(self):
        """SIGTERM to the server's process group, SIGKILL after 15 s."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def log(self) -> str:
        """The server's output without ANSI colour codes."""
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return re.sub(r"\x1b\[[0-9;]*m", "", f.read())

    def request(self, path: str, data=None, timeout: float = 30) -> tuple[int, bytes]:
        body = None if data is None else json.dumps(data).encode()
        req = urllib.request.Request(self.url + path, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def get(self, path: str, timeout: float = 30):
        status, body = self.request(path, timeout=timeout)
        if status != 200:
            raise ComfyError(f"GET {path}: HTTP {status}: {body[:2000]!r}")
        return json.loads(body)

    def run_prompt(self, api: dict, timeout: float = 600, poll: float = 0.5) -> dict:
        """Queue an API-format graph, wait for its /history entry; returns the entry (outputs, status).
        Raises ComfyError with the server's reasons when the prompt is refused, fails or runs out of time."""
        status, body = self.request("/prompt", {"prompt": api})
        reply = json.loads(body or b"null")
        if status != 200 or "prompt_id" not in (reply or {}):
            raise ComfyError(f"/prompt refused the graph (HTTP {status}): {json.dumps(reply, indent=1)[:6000]}")
        prompt_id = reply["prompt_id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{urllib.parse.quote(prompt_id)}").get(prompt_id)
            if entry and (entry.get("status") or {}).get("completed") is not None:
                if entry["status"].get("status_str") != "success":
                    errors = [data for kind, data in entry["status"].get("messages", [])
                              if kind in ("execution_error", "execution_interrupted")]
                    raise ComfyError(f"prompt {prompt_id} failed: {json.dumps(errors, indent=1)[:8000]}")
                return entry
            time.sleep(poll)
        self.request("/interrupt", {})
        raise ComfyError(f"prompt {prompt_id} did not finish within {timeout:.0f} s")

    def output_files(self, entry: dict) -> list[str]:
        """Paths in the base directory of the files a finished prompt wrote (its outputs' items)."""
        paths = []
        for output in entry.get("outputs", {}).values():
            for items in output.values():
                for item in items if isinstance(items, list) else []:
                    if isinstance(item, dict) and "filename" in item:
                        paths.append(os.path.join(self.base_dir, item.get("type", "output"),
                                                  item.get("subfolder", ""), item["filename"]))
        return paths
