"""Use notebook 04's widget panel in a real browser, as a person would: JupyterLab in headless Chromium.

    ./run.sh browser-check                     # installs requirements-browser.txt, then runs this
    python tools/browser_check.py [--screenshot docs/browser_check.png] [--timeout 300]

What it does, on the tiny profile, offline:
  1. copies notebooks/04_sampling.ipynb into a temporary folder (JupyterLab autosaves: the repository's copy
     must stay without outputs), trains each adapter variant for 2 steps into a fresh output root (so the
     panel has three models; --train-steps 0 for the pretrained one alone), and starts JupyterLab there;
  2. opens the notebook in headless Chromium (Debian's `chromium` package), driven over the DevTools protocol,
     and runs all cells (the command behind Run > Run All Cells);
  3. checks that the panel rendered (the Generate button, the thumbnails' captions, the settings box);
  4. types a new prompt, clicks Generate with the mouse, and waits for new pictures in the result row;
  5. drags the IP-scale slider's handle with the mouse and checks that the settings box beside it shows
     the new scale;
  6. saves a screenshot of the panel, and prints the wall time.

Exit status 0 when every check passed. Chromium must be installed (`apt-get install chromium`); jupyterlab
and websocket-client come from requirements-browser.txt.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = "04_sampling.ipynb"
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check, timeout: float, every: float = 0.5):
    """Poll check() until it returns a truthy value; raise TimeoutError naming `what`."""
    end = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > end:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


class Browser:
    """Headless Chromium driven over the DevTools protocol (one page, plain JSON messages)."""

    def __init__(self, binary: str, width: int = 1400, height: int = 1800):
        import websocket  # websocket-client

        self.port = free_port()
        self.profile = tempfile.mkdtemp(prefix="chromium-")
        self.proc = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             f"--remote-debugging-port={self.port}", "--remote-allow-origins=*", f"--user-data-dir={self.profile}",
             f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        targets = wait_for("Chromium's DevTools endpoint", self._targets, 30)
        page = next(t for t in targets if t["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60)
        self.next_id = 0

    def _targets(self):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json", timeout=2) as r:
                return json.load(r)
        except OSError:
            return None

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def js(self, expression: str):
        """Evaluate JavaScript in the page and return its (JSON) value."""
        out = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in out:
            raise RuntimeError(f"JavaScript failed: {out['exceptionDetails'].get('exception', {}).get('description')}")
        return out["result"].get("value")

    def center(self, selector_js: str) -> tuple[float, float]:
        """Scroll the element (a JS expression) into view; its centre in viewport pixels."""
        rect = self.js(f"(() => {{ const e = {selector_js}; if (!e) return null; e.scrollIntoView({{block: 'center'}});"
                       " const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        if rect is None:
            raise LookupError(f"no element for {selector_js}")
        return rect[0], rect[1]

    def mouse(self, kind: str, x: float, y: float, buttons: int = 1):
        self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", buttons=buttons, clickCount=1)

    def click(self, selector_js: str):
        x, y = self.center(selector_js)
        self.mouse("mouseMoved", x, y, 0)
        self.mouse("mousePressed", x, y)
        self.mouse("mouseReleased", x, y, 0)

    def drag(self, selector_js: str, dx: float, steps: int = 10):
        x, y = self.center(selector_js)
        self.mouse("mouseMoved", x, y, 0)
        self.mouse("mousePressed", x, y)
        for i in range(1, steps + 1):
            self.mouse("mouseMoved", x + dx * i / steps, y)
        self.mouse("mouseReleased", x + dx, y, 0)

    def type(self, text: str):
        self.call("Input.insertText", text=text)

    def key(self, key: str, code: str, modifiers: int = 0, vk: int = 0):
        for kind in ("rawKeyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, key=key, code=code, modifiers=modifiers,
                      windowsVirtualKeyCode=vk)

    def screenshot(self, selector_js: str | None = None) -> bytes:
        clip = None
        if selector_js:
            box = self.js(f"(() => {{ const e = {selector_js}; e.scrollIntoView({{block: 'start'}}); "
                          "const r = e.getBoundingClientRect(); return [r.x, r.y, r.width, r.height]; })()")
            clip = {"x": box[0], "y": max(0, box[1]), "width": box[2], "height": box[3], "scale": 1}
        out = self.call("Page.captureScreenshot", format="png", **({"clip": clip} if clip else {}))
        return base64.b64decode(out["data"])

    def close(self):
        try:
            self.ws.close()
        finally:
            self.proc.terminate()
            self.proc.wait(10)
            shutil.rmtree(self.profile, ignore_errors=True)


def start_jupyter(folder: Path, env: dict) -> tuple[subprocess.Popen, str, Path]:
    """JupyterLab serving `folder`, every cell rendered (no windowing), window.jupyterapp exposed."""
    port, token = free_port(), "browser-check"
    settings = folder / ".lab-settings"
    tracker = settings / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings"
    tracker.parent.mkdir(parents=True)
    tracker.write_text(json.dumps({"windowingMode": "none"}))
    log = folder / "jupyter.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={folder}", "--LabApp.expose_app_in_browser=True",
         f"--LabApp.user_settings_dir={settings}", f"--LabApp.workspaces_dir={folder / '.workspaces'}",
         *(["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else [])],  # CI runs as root
        stdout=log.open("w"), stderr=subprocess.STDOUT, env={**env, "JUPYTER_RUNTIME_DIR": str(folder / ".runtime")})
    url = f"http://127.0.0.1:{port}/lab/tree/{NOTEBOOK}?token={token}"

    def up():
        if proc.poll() is not None:
            raise RuntimeError(f"JupyterLab exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2):
                return True
        except OSError:
            return False
    wait_for("JupyterLab to start", up, 90)
    return proc, url, log


NOTEBOOK_PANEL = "[...window.jupyterapp.shell.widgets('main')].find(w => w.sessionContext)"
# JavaScript snippets: the panel's elements, found the way a person finds them (by their visible text)
BUTTON = "[...document.querySelectorAll('button')].find(b => b.textContent.trim() === {!r})"
SETTINGS = "document.querySelector('.ipa-settings')"
PANEL = f"{SETTINGS}.closest('.jp-OutputArea-output')"  # the output of the cell that displays panel.ui
SCALE_ROW = ("[...document.querySelectorAll('.widget-slider')].find(w => (w.querySelector('label')?.textContent || '')"
             ".trim() === 'IP scale')")
SCALE_HANDLE = f"{SCALE_ROW}?.querySelector('.noUi-handle, .ui-slider-handle')"
PROMPT_INPUT = ("[...document.querySelectorAll('.widget-text')].find(w => (w.querySelector('label')?.textContent || '')"
                ".trim() === 'Prompt')?.querySelector('input')")
RESULT_IMAGES = ("[...document.querySelectorAll('.widget-vbox')].filter(v => v.children.length === 2 && "
                 "v.children[0].classList.contains('widget-html') && v.children[1].tagName === 'IMG')"
                 ".map(v => [v.children[0].textContent, v.children[1].src, v.children[1].naturalWidth])")
STATUS_TEXT = ("[...document.querySelectorAll('.widget-html')].map(e => e.textContent)"
               ".find(t => t.includes(' images in ') || t.includes('Error')) || ''")


def run_check(args) -> dict:
    binary = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if binary is None:
        raise SystemExit("no Chromium found: install it (Debian/Ubuntu: apt-get install chromium)")
    timings, results = {}, {}
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="browser-check-"))
    shutil.copy(ROOT / "notebooks" / NOTEBOOK, work / NOTEBOOK)
    env = {**os.environ, "IPA_PROFILE": "tiny", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "IPA_OUTPUT_ROOT": str(work / "outputs")}
    if args.runs:  # adapters trained earlier (e.g. outputs/runs): the panel then compares three models
        shutil.copytree(args.runs, work / "outputs" / "runs")
    elif args.train_steps:  # a few training steps per variant, so that the panel has three models to compare
        for variant in ("text_aware", "vanilla"):
            subprocess.run([sys.executable, "-m", "helpers.train", "--profile", "tiny", "--variant", variant,
                            "--output-dir", str(work / "outputs" / "runs" / variant),
                            "--data-dir", str(work / "outputs" / "data"), "--max-steps", str(args.train_steps)],
                           env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        timings["train adapters"] = time.perf_counter() - start
    jupyter, url, log = start_jupyter(work, env)
    browser = Browser(binary)
    try:
        browser.call("Page.navigate", url=url)
        wait_for("the notebook to open", lambda: browser.js(
            "!!(window.jupyterapp && document.querySelector('.jp-Notebook .jp-Cell'))"), 120)
        wait_for("the kernel to start", lambda: browser.js(f"{NOTEBOOK_PANEL}?.sessionContext?.session?.kernel?.status === 'idle'"), 120)
        timings["open"] = time.perf_counter() - start
        browser.js(f"window.jupyterapp.shell.activateById({NOTEBOOK_PANEL}.id)")
        browser.js("window.jupyterapp.commands.execute('notebook:run-all-cells')")  # Run > Run All Cells
        code_cells = browser.js("document.querySelectorAll('.jp-CodeCell').length")

        def finished():
            prompts = browser.js("[...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].map(e => e.textContent)")
            done = [p for p in prompts if any(ch.isdigit() for ch in p)]
            return len(done) == code_cells and not any("*" in p for p in prompts)
        wait_for("every cell to run", finished, args.timeout)
        timings["run all cells"] = time.perf_counter() - start
        errors = browser.js("[...document.querySelectorAll('.jp-OutputArea-output[data-mime-type=\"application/vnd.jupyter.stderr\"]')]"
                            ".map(e => e.textContent).filter(t => t.includes('Traceback') || t.includes('Error:'))")
        results["cells without errors"] = not errors
        if errors:
            print("errors in cell outputs:\n" + "\n".join(e[:500] for e in errors))

        # the panel rendered
        wait_for("the panel's Generate button", lambda: browser.js(f"!!({BUTTON.format('Generate')})"), 30)
        results["panel rendered"] = True
        results["thumbnails show captions"] = browser.js(
            "[...document.querySelectorAll('.widget-html')].some(e => e.textContent.startsWith('a cartoon drawing'))")
        settings_before = browser.js(f"{SETTINGS}.textContent")
        results["scale slider starts at SCALE (0.7)"] = "IP scale: 0.7" in settings_before

        # a new prompt, typed; a click on Generate; new pictures
        before = {label.split(" (")[0]: src for label, src, _ in browser.js(RESULT_IMAGES)}
        browser.click(PROMPT_INPUT)
        browser.key("a", "KeyA", modifiers=2, vk=65)  # Ctrl+A
        browser.type("a cartoon drawing in space at night")
        browser.key("Tab", "Tab", vk=9)
        wait_for("the typed prompt in the settings box", lambda: "in space at night" in browser.js(f"{SETTINGS}.textContent"), 10)
        t = time.perf_counter()
        browser.click(BUTTON.format("Generate"))

        def new_images():
            images = browser.js(RESULT_IMAGES)
            fresh = [(label, w) for label, src, w in images if src and src != before.get(label.split(" (")[0]) and w > 0]
            return fresh if len(fresh) == len(images) and " images in " in browser.js(STATUS_TEXT) else None
        fresh = wait_for("the pictures of the click on Generate", new_images, 120)
        timings["generate (click to pictures)"] = time.perf_counter() - t
        results["a click on Generate drew a new picture per model"] = bool(fresh)
        print("pictures:", ", ".join(label for label, _ in fresh))

        # a dragged slider changes the settings written beside it
        browser.drag(SCALE_HANDLE, dx=40)

        def settled():  # the kernel answers each move of the handle; wait for the last one
            readout = float(browser.js(f"{SCALE_ROW}.querySelector('.widget-readout').textContent"))
            text = browser.js(f"{SETTINGS}.textContent")
            return (readout, text) if f"IP scale: {readout:g}seed" in text.replace("\n", "") else None
        readout, settings_after = wait_for("the settings box to show the slider's value", settled, 20)
        results["dragged slider changed the settings box"] = readout != 0.7 and settings_after != settings_before
        print(f"slider readout after the drag: {readout:g}; the settings box says 'IP scale: {readout:g}'")
        png = browser.screenshot(PANEL)
    finally:
        browser.close()
        jupyter.terminate()
        jupyter.wait(20)
    _save_screenshot(png, Path(args.screenshot))
    timings["total"] = time.perf_counter() - start
    shutil.rmtree(work, ignore_errors=True)
    return {"results": results, "timings_s": {k: round(v, 1) for k, v in timings.items()}}


def _save_screenshot(png: bytes, path: Path, width: int = 900):
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    if image.width > width:
        image = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.quantize(256).save(path, optimize=True)  # a palette PNG: a small file to keep in the repository
    print(f"screenshot: {path} ({image.width} x {image.height}, {path.stat().st_size // 1024} KiB)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--screenshot", default=str(ROOT / "docs" / "browser_check.png"))
    ap.add_argument("--timeout", type=float, default=300, help="seconds for running all cells")
    ap.add_argument("--runs", help="a runs folder with trained adapters, copied in (instead of --train-steps)")
    ap.add_argument("--train-steps", type=int, default=2,
                    help="train each variant this many steps first, so the panel has three models (0: pretrained only)")
    args = ap.parse_args(argv)
    report = run_check(args)
    print(json.dumps(report, indent=1))
    failed = [name for name, ok in report["results"].items() if not ok]
    print("browser check:", "FAILED: " + "; ".join(failed) if failed else "all checks passed",
          f"in {report['timings_s']['total']} s")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
