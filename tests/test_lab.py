"""JupyterLab is the study's front end (issue 21): every notebook names the registered kernel, and a real JupyterLab
server runs a notebook on it as a person does: open it through the contents API, start a session on the
`spatialstudy` kernel, run its cells through the kernel's websocket, save it, then load the lab page in headless
Chromium. Everything stays on 127.0.0.1 and in temp dirs; the server is shut down even when a check fails.

The browser part needs Debian's `chromium` (`.ci/run` installs it). `make lab-screenshot` re-takes the README's
picture (reports/figures/jupyterlab.png): SPATIALSTUDY_SCREENSHOT=<path> copies the screenshot there.
"""
import base64
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from datetime import datetime, timezone
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from nbval_refresh import is_checked  # noqa: E402  (nbval's own reading of the NBVAL_CHECK_OUTPUT marker)
from nbval.plugin import coalesce_streams  # noqa: E402

KERNEL = {"name": "spatialstudy", "display_name": "Python (spatialstudy)", "language": "python"}
REGISTER = ("register it with `make venv` (python -m ipykernel install --sys-prefix --name spatialstudy "
            '--display-name "Python (spatialstudy)")')
NOTEBOOK = "01_data.ipynb"  # the fastest notebook: seconds at its ci defaults
# what `make test` gives nbval (tests/conftest.py, tools/nbval_refresh.py): the kernel inherits it from the server
KERNEL_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1", "MPLBACKEND": "Agg",
              "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
START_S, NOTEBOOK_S, BROWSER_S = 60, 150, 90  # failure deadlines; a passing run takes ~30 s in all


@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.name)
def test_notebook_names_registered_kernel(path):
    kernelspec = json.loads(path.read_text(encoding="utf-8"))["metadata"].get("kernelspec")
    assert kernelspec == KERNEL, (f"{path.name}: metadata.kernelspec is {kernelspec}; set it to {KERNEL} "
                                  "(JupyterLab outside the venv would run the notebook without the package)")


def test_registered_kernel_is_this_environment():
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec(KERNEL["name"])
    except NoSuchKernel:
        pytest.fail(f"kernel {KERNEL['name']!r} is not registered; {REGISTER}")
    assert spec.display_name == KERNEL["display_name"], REGISTER
    assert Path(spec.argv[0]).parent.resolve() == Path(sys.executable).parent.resolve(), \
        f"kernel {KERNEL['name']!r} runs {spec.argv[0]}, not this environment's python; {REGISTER}"


# ---------------------------------------------------------------- a real JupyterLab server
class Lab:
    def __init__(self, proc, port, token, log):
        self.proc, self.port, self.token, self.log = proc, port, token, log
        self.url = f"http://127.0.0.1:{port}"

    def api(self, method, path, body=None, timeout=30):
        request = urllib.request.Request(f"{self.url}/api/{path}", method=method,
                                         data=None if body is None else json.dumps(body).encode(),
                                         headers={"Authorization": f"token {self.token}",
                                                  "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")

    def log_tail(self, n=3000):
        return self.log.read_text(errors="replace")[-n:]

    def wait_ready(self, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"JupyterLab exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if self.api("GET", "status", timeout=2)[0] == 200:
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        pytest.fail(f"JupyterLab did not answer within {timeout} s:\n{self.log_tail()}")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc, runtime_dir):
    """SIGTERM makes the server shut its kernels down (they run in sessions of their own); then make sure."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        except ProcessLookupError:
            pass
    # a kernel left behind (server killed hard) names its connection file in this server's own runtime dir
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(runtime_dir).encode() in cmdline.read_bytes():
                os.kill(int(cmdline.parent.name), signal.SIGKILL)
        except OSError:
            pass


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab on a temp copy of the notebook, runs in a temp SPATIALSTUDY_ROOT, jupyter dirs in temp too."""
    base = tmp_path_factory.mktemp("lab")
    notebooks = base / "root" / "notebooks"
    notebooks.mkdir(parents=True)
    shutil.copy(ROOT / "notebooks" / NOTEBOOK, notebooks / NOTEBOOK)
    news = base / "config" / "lab" / "user-settings" / "@jupyterlab" / "apputils-extension"
    news.mkdir(parents=True)
    (news / "notification.jupyterlab-settings").write_text('{"fetchNews": "false", "checkForUpdates": false}')
    runtime = base / "runtime"
    env = {**os.environ, **KERNEL_ENV, "SPATIALSTUDY_ROOT": str(base / "root"),
           "JUPYTER_CONFIG_DIR": str(base / "config"), "JUPYTER_DATA_DIR": str(base / "data"),
           "JUPYTER_RUNTIME_DIR": str(runtime), "IPYTHONDIR": str(base / "ipython")}
    port, token = _free_port(), secrets.token_hex(16)
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
               "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={notebooks}"]
    if os.geteuid() == 0:
        command.append("--allow-root")
    log = base / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=notebooks, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        server = Lab(proc, port, token, log)
        server.wait_ready(START_S)
        yield server
    finally:
        _stop(proc, runtime)


# ---------------------------------------------------------------- the kernel, through its websocket
def _request(ws, session, msg_type, content, deadline):
    """One shell request, as JupyterLab sends it; returns (its reply's content, the outputs as nbformat nodes)."""
    import websocket

    msg_id = uuid.uuid4().hex
    ws.send(json.dumps({
        "header": {"msg_id": msg_id, "msg_type": msg_type, "session": session, "username": "test",
                   "date": datetime.now(timezone.utc).isoformat(), "version": "5.3"},
        "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [], "content": content}))
    reply, idle, outputs = None, False, []
    while reply is None or not idle:
        ws.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            frame = ws.recv()
        except websocket.WebSocketTimeoutException:
            pytest.fail(f"the kernel did not answer {msg_type} within the notebook's {NOTEBOOK_S} s:\n"
                        f"{str(content.get('code', ''))[:300]}")
        if isinstance(frame, bytes):  # binary frames carry buffers (widgets); none here
            continue
        msg = json.loads(frame)
        if msg.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        kind, body = msg["header"]["msg_type"], msg["content"]
        if kind == msg_type.replace("_request", "_reply"):
            reply = body
        elif kind == "status":
            idle = idle or body["execution_state"] == "idle"
        elif kind == "clear_output":
            outputs.clear()
        elif kind in ("stream", "execute_result", "display_data", "error"):
            outputs.append(nbformat.v4.output_from_msg(msg))
    return reply, outputs


def _streams(outputs):
    return [(o.name, o.text) for o in coalesce_streams([nbformat.from_dict(o) for o in outputs])
            if o.output_type == "stream"]


@pytest.mark.slow
def test_notebook_runs_on_its_kernel_through_lab(lab):
    import websocket

    status, specs = lab.api("GET", "kernelspecs")
    assert KERNEL["name"] in specs["kernelspecs"], f"JupyterLab does not offer {KERNEL['name']!r}; {REGISTER}"
    status, model = lab.api("GET", f"contents/{NOTEBOOK}")  # open the notebook, as the file browser does
    assert status == 200 and model["type"] == "notebook"
    nb = nbformat.from_dict(model["content"])
    assert nb.metadata.kernelspec.name == KERNEL["name"]

    status, session = lab.api("POST", "sessions", {"path": NOTEBOOK, "name": NOTEBOOK, "type": "notebook",
                                                   "kernel": {"name": nb.metadata.kernelspec.name}})
    assert status == 201 and session["kernel"]["name"] == KERNEL["name"], session
    client = uuid.uuid4().hex
    ws = websocket.create_connection(f"ws://127.0.0.1:{lab.port}/api/kernels/{session['kernel']['id']}/channels"
                                     f"?session_id={client}&token={lab.token}", timeout=START_S)
    deadline = time.monotonic() + NOTEBOOK_S
    stored = {}
    try:
        for i, cell in enumerate(nb.cells):  # "Run All", cell by cell, at the notebook's ci defaults
            if cell.cell_type != "code":
                continue
            reply, outputs = _request(ws, client, "execute_request", {
                "code": cell.source, "silent": False, "store_history": True, "user_expressions": {},
                "allow_stdin": False, "stop_on_error": True}, deadline)
            if reply["status"] != "ok":
                trace = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(reply.get("traceback", [])))
                pytest.fail(f"{NOTEBOOK} cell {i} failed on the lab kernel: {reply.get('ename')}: "
                            f"{reply.get('evalue')}\n{trace[-2000:]}")
            if is_checked(cell):
                stored[i] = cell.outputs
                assert _streams(outputs) == _streams(cell.outputs), \
                    f"{NOTEBOOK} cell {i} (NBVAL_CHECK_OUTPUT) printed other than its stored ci-tier reference"
            cell.outputs, cell.execution_count = outputs, reply["execution_count"]
        # the kernel's language_info, which JupyterLab writes into the notebook on connecting
        nb.metadata.language_info = _request(ws, client, "kernel_info_request", {}, deadline)[0]["language_info"]
    finally:
        ws.close()
    assert stored, f"{NOTEBOOK} has no NBVAL_CHECK_OUTPUT summary cell to compare"

    # save, as the browser does; the page then shows the executed notebook (the temp copy, never the repo's)
    status, _ = lab.api("PUT", f"contents/{NOTEBOOK}", {"type": "notebook", "format": "json", "content": nb})
    assert status == 200
    saved = nbformat.from_dict(lab.api("GET", f"contents/{NOTEBOOK}")[1]["content"])
    for i, outputs in stored.items():
        assert _streams(saved.cells[i].outputs) == _streams(outputs)


# ---------------------------------------------------------------- the lab page, in headless Chromium
def _browser():
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


class Chromium:
    """Headless Chromium driven over its DevTools websocket (127.0.0.1): load a page, read it, screenshot it."""

    def __init__(self, browser, profile):
        import websocket

        self.proc = subprocess.Popen(
            [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--hide-scrollbars", "--window-size=1400,900", f"--user-data-dir={profile}",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            port = self._wait(lambda: self._devtools_port(profile), "to open its DevTools port")
            page = self._wait(lambda: next((t for t in json.load(urllib.request.urlopen(
                f"http://127.0.0.1:{port}/json/list", timeout=5)) if t["type"] == "page"), None), "to list its page")
            self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=BROWSER_S,
                                                  suppress_origin=True)
        except BaseException:
            self.close()
            raise
        self.n = 0

    def _wait(self, probe, what, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"headless Chromium exited with {self.proc.returncode}")
            try:
                found = probe()
            except OSError:
                found = None
            if found:
                return found
            time.sleep(0.2)
        pytest.fail(f"headless Chromium failed {what} within {timeout} s")

    @staticmethod
    def _devtools_port(profile):
        lines = (profile / "DevToolsActivePort").read_text().split()
        return int(lines[0]) if len(lines) >= 2 else None

    def call(self, method, **params):
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.n:
                assert "error" not in msg, f"DevTools {method}: {msg['error']}"
                return msg["result"]

    def evaluate(self, expression):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def close(self):
        if getattr(self, "ws", None):
            self.ws.close()
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_lab_page_shows_notebook_on_its_kernel(lab, tmp_path):
    browser = _browser()
    if browser is None:
        pytest.skip("no headless Chromium for the lab page: apt-get install chromium (.ci/run installs it)")
    nb = nbformat.read(ROOT / "notebooks" / NOTEBOOK, as_version=4)
    title = nb.cells[0].source.splitlines()[0].lstrip("# ").strip()  # "01 · Data"
    # what a person sees: the notebook's tab, its rendered title, and the status bar naming the kernel, ready
    wanted = {"tab": NOTEBOOK, "title": title, "kernel": f"{KERNEL['display_name']} | Idle"}
    page = Chromium(browser, tmp_path / "chromium")
    try:
        page.call("Page.bringToFront")  # a page without focus gets no animation frames: JupyterLab would stall
        page.call("Emulation.setDeviceMetricsOverride", width=1400, height=900, deviceScaleFactor=1, mobile=False)
        page.call("Page.navigate", url=f"{lab.url}/lab/tree/{NOTEBOOK}?token={lab.token}")
        deadline, text = time.monotonic() + BROWSER_S, ""
        while time.monotonic() < deadline:
            text = page.evaluate("document.body ? document.body.innerText : ''") or ""
            if all(shown in text for shown in wanted.values()):
                break
            time.sleep(0.5)
        else:
            missing = [name for name, shown in wanted.items() if shown not in text]
            pytest.fail(f"after {BROWSER_S} s the lab page does not show {missing}; it shows:\n{text[:600]}\n"
                        f"...\n{text[-600:]}")
        time.sleep(1)  # let the last paint settle before the picture
        png = base64.b64decode(page.call("Page.captureScreenshot", format="png")["data"])
    finally:
        page.close()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000, "blank screenshot?"
    shot = tmp_path / "jupyterlab.png"
    shot.write_bytes(png)
    if os.environ.get("SPATIALSTUDY_SCREENSHOT"):  # make lab-screenshot: the README's picture of the front end
        target = ROOT / os.environ["SPATIALSTUDY_SCREENSHOT"]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, target)
