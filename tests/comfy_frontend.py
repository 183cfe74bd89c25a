"""ComfyUI's real frontend in headless Chromium, for the tests: convert UI workflows to the API format exactly as
the Run button does, read the template browser, take thumbnails. Standard library only: Chromium is driven over
its DevTools protocol on a pipe (--remote-debugging-pipe: JSON messages ended by NUL on file descriptors 3 and 4),
so no websocket client is needed.

Chromium is `$CHROMIUM`, else `chromium` / `chromium-browser` / `google-chrome` on PATH (Debian/Ubuntu:
`apt-get install -y chromium`). Refresh the example workflows' thumbnails (needs COMFYUI_DIR):

    python tests/comfy_frontend.py thumbnails
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time

FRONTEND_TIMEOUT_S = 90


class BrowserError(RuntimeError):
    """Chromium or the page did not do what was asked."""


def find_chromium() -> str | None:
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"]
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


def _high_fd(fd: int) -> int:
    """A close-on-exec copy of fd numbered 10 or above (placing the pipes on 3 and 4 in the child cannot clobber it)."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


class Browser:
    """One headless Chromium with one page; a context manager (the browser is always closed)."""

    def __init__(self, chromium: str, width: int = 1400, height: int = 900):
        self.profile = tempfile.mkdtemp(prefix="wantalk-chromium-")
        to_browser_r, self.to_browser = map(_high_fd, os.pipe())
        self.from_browser, from_browser_w = map(_high_fd, os.pipe())

        def pipes_on_3_and_4():
            os.dup2(to_browser_r, 3)
            os.dup2(from_browser_w, 4)

        self.process = subprocess.Popen(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
             "--disable-background-networking", "--disable-component-update", "--remote-debugging-pipe",
             "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", f"--user-data-dir={self.profile}",
             f"--window-size={width},{height}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=pipes_on_3_and_4, pass_fds=(3, 4))
        os.close(to_browser_r)
        os.close(from_browser_w)
        self.buffer, self.next_id, self.session = b"", 0, None
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Page.enable")
        self.call("Runtime.enable")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        try:
            self.session = None
            self.call("Browser.close", timeout=5)
        except (BrowserError, OSError):
            pass
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for fd in (self.to_browser, self.from_browser):
            os.close(fd)
        shutil.rmtree(self.profile, ignore_errors=True)

    def _message(self, deadline: float) -> dict:
        while b"\0" not in self.buffer:
            ready, _, _ = select.select([self.from_browser], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(self.from_browser, 1 << 20) if ready else None
            if not chunk:
                raise BrowserError("Chromium closed the DevTools pipe" if ready else "no answer from Chromium")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, timeout: float = 60, **params) -> dict:
        """One DevTools command (on the page's session once attached); returns its result."""
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if self.session:
            message["sessionId"] = self.session
        os.write(self.to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._message(deadline)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def evaluate(self, expression: str, timeout: float = 60):
        """The value of a JavaScript expression in the page (promises awaited); page exceptions raise."""
        result = self.call("Runtime.evaluate", timeout=timeout, expression=expression, awaitPromise=True,
                           returnByValue=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise BrowserError(details.get("exception", {}).get("description") or details.get("text"))
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float, what: str):
        """Poll a JavaScript condition until it is truthy; returns its value."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                value = self.evaluate(expression)
            except BrowserError:
                value = None
            if value:
                return value
            time.sleep(0.3)
        raise BrowserError(f"timed out after {timeout:.0f} s waiting for {what}")


# The frontend has started when its app object has a graph, the node definitions from /object_info are registered,
# the Vue app is mounted and (newer frontends) the workflow store has made a workflow active: loading a graph
# before that can be overwritten by the frontend's own start-up.
FRONTEND_READY = """(() => {
  const app = window.app;
  if (!app || !app.graph || !window.LiteGraph || !app.extensionManager || app.vueAppReady === false) return false;
  if (!Object.keys(LiteGraph.registered_node_types || {}).includes(%s)) return false;
  const workflows = app.extensionManager.workflow;
  return !(workflows && "activeWorkflow" in workflows && !workflows.activeWorkflow);
})()"""


# Frontend 1.47: the template browser's cards carry data-testid "template-workflow-<name>".
CARD_ID = "template-workflow-"
TEMPLATE_CARDS = f"[...document.querySelectorAll('[role=dialog] [data-testid^=\"{CARD_ID}\"]')]"


class Frontend:
    """The page of a running ComfyUI server in a Browser."""

    def __init__(self, browser: Browser, url: str, known_node_type: str = "WanTalkModelLoader"):
        self.browser = browser
        browser.call("Page.navigate", url=url)
        browser.wait_for(FRONTEND_READY % json.dumps(known_node_type), FRONTEND_TIMEOUT_S, "the ComfyUI frontend")
        time.sleep(1.5)   # a first start (fresh user folder) opens the template browser by itself
        self.close_dialogs()

    def close_dialogs(self):
        """Close every open dialog with its own close button, as a user does."""
        self.browser.evaluate("(document.querySelectorAll('[role=dialog] button[aria-label=\"Close dialog\"]')"
                              ".forEach(b => b.click()), true)")
        self.browser.wait_for("!document.querySelector('[role=dialog]')", 10, "the dialogs to close")

    def load(self, ui_workflow: dict):
        self.browser.evaluate(f"app.loadGraphData({json.dumps(ui_workflow)}, true, true, 'wantalk-test')")

    def to_api(self, ui_workflow: dict) -> dict:
        """The API-format graph the frontend queues for this UI workflow (app.graphToPrompt, as the Run button)."""
        self.load(ui_workflow)
        return json.loads(self.browser.evaluate("app.graphToPrompt().then(p => JSON.stringify(p.output))"))

    def graph_node_types(self) -> list[str]:
        """Types of the nodes on the canvas, sorted."""
        return sorted(self.browser.evaluate("app.graph.nodes.map(n => n.type)"))

    def _open_pack_templates(self, pack: str) -> list[str]:
        """Open the template browser (Templates dialog) on the pack's entry under Extensions; returns the names of
        the cards it shows once they stop changing."""
        self.browser.evaluate("(document.querySelectorAll('[role=dialog]').length ||"
                              " app.extensionManager.command.execute('Comfy.BrowseTemplates'), true)")
        entry = (f"[...document.querySelectorAll('[role=dialog] [role=button]')]"
                 f".find(e => e.innerText.trim() == {json.dumps(pack)})")
        self.browser.wait_for(f"!!{entry}", 20, f"the entry {pack} in the template browser")
        self.browser.evaluate(f"({entry}.click(), true)")
        self.browser.wait_for(f"{entry}.className.includes('selected')", 20, f"the entry {pack} to be selected")
        shown = None
        for _ in range(40):
            time.sleep(0.5)
            now = sorted(self.browser.evaluate(f"{TEMPLATE_CARDS}.map(c => c.dataset.testid.slice({len(CARD_ID)}))"))
            if now and now == shown:
                return now
            shown = now
        raise BrowserError(f"the template browser's cards for {pack} did not settle: {shown}")

    def template_cards(self, pack: str) -> list[str]:
        """Names of the workflow cards the template browser shows for the pack, sorted."""
        return self._open_pack_templates(pack)

    def template_thumbnail_size(self, pack: str, name: str) -> tuple[int, int]:
        """(width, height) of the image the card shows once scrolled into view (cards load images lazily)."""
        self._open_pack_templates(pack)
        card = f"document.querySelector('[data-testid=\"{CARD_ID}{name}\"]')"
        self.browser.evaluate(f"({card}.scrollIntoView(), true)")
        size = self.browser.wait_for(f"(i => i && i.complete && i.naturalWidth ? [i.naturalWidth, i.naturalHeight]"
                                     f" : null)({card}.querySelector('img'))", 20, f"the thumbnail of {name}")
        return tuple(size)

    def open_template(self, pack: str, name: str) -> list[str]:
        """Click the card (as a user does); returns the types of the nodes of the opened workflow, sorted."""
        self._open_pack_templates(pack)
        self.browser.evaluate(f"(document.querySelector('[data-testid=\"{CARD_ID}{name}\"]').click(), true)")
        self.browser.wait_for(f"document.title.includes({json.dumps(name)})", 20, f"the workflow {name} to open")
        return self.graph_node_types()


def thumbnails(pack_dir: str):
    """Write example_workflows/<name>.jpg for every UI workflow: the graph as the frontend draws it, fitted to the
    view, with every model file present (empty stand-ins under the real names, so no node shows a missing file)."""
    import importlib.util
    from comfy_server import ComfyServer, comfyui_dir
    chromium, comfy = find_chromium(), comfyui_dir()
    if not (chromium and comfy):
        raise SystemExit("thumbnails need Chromium (or CHROMIUM) and COMFYUI_DIR")
    workflow_dir = os.path.join(pack_dir, "example_workflows")
    spec = importlib.util.spec_from_file_location("build_workflows", os.path.join(workflow_dir, "build_workflows.py"))
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    with ComfyServer(comfy, pack_dir) as server:
        for name, (_, folder) in builder.MODEL_URLS.items():
            os.makedirs(os.path.join(server.base_dir, "models", folder), exist_ok=True)
            open(os.path.join(server.base_dir, "models", folder, name), "wb").close()
        from run_demo import import_pack
        import_pack()[1].make_tiny_inputs(os.path.join(server.base_dir, "input"))
        with Browser(chromium, 1920, 1080) as browser:
            frontend = Frontend(browser, server.url)
            for name in builder.WORKFLOWS:
                with open(builder.ui_path(name), encoding="utf-8") as f:
                    frontend.load(json.load(f))
                browser.evaluate("app.extensionManager.command.execute('Comfy.Canvas.FitView')")
                time.sleep(1.5)
                frontend.close_dialogs()
                shot = browser.call("Page.captureScreenshot", format="jpeg", quality=85,
                                    clip={"x": 60, "y": 40, "width": 1860, "height": 1040, "scale": 0.5})
                with open(os.path.join(workflow_dir, f"{name}.jpg"), "wb") as f:
                    f.write(base64.b64decode(shot["data"]))
                print("wrote", name + ".jpg")


if __name__ == "__main__":
    if sys.argv[1:] != ["thumbnails"]:
        raise SystemExit(__doc__)
    ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, ROOT)
    thumbnails(ROOT)
