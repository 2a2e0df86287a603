"""JupyterLab on 127.0.0.1 and a notebook driven in headless Chromium, for the tests in tests/browser.

Example::

    >>> with JupyterLab(root_dir, home=tmp) as lab:                              # doctest: +SKIP
    ...     page.goto(lab.url("03_train_amp.ipynb"))
    ...     book = NotebookPage(page, lab, "03_train_amp.ipynb", shots_dir)
    ...     book.run_all(timeout_s=120)
"""

from __future__ import annotations

import atexit
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
INSTALL = "pip install -c constraints.txt -r requirements-dev.txt (make test does)"
PLAYWRIGHT_MISSING = f"playwright is not installed: {INSTALL}"
CHROMIUM_MISSING = (f"no Chromium at {CHROMIUM}: install Debian's package as root "
                    "(apt-get install chromium; .ci/run does) to run the browser tests")
JUPYTERLAB_MISSING = f"jupyterlab is not installed: {INSTALL}"
# Headless, and none of Chromium's own traffic (updates, sync, field trials): the page talks to 127.0.0.1 only.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# Server settings that keep JupyterLab off the network: no news feed, no update check, no PyPI
# extension manager (it lists extensions from pypi.org).
SERVER_CONFIG = {
    "LabApp": {"news_url": None, "extension_manager": "readonly",
               "check_for_updates_class": "jupyterlab.handlers.announcements.NeverCheckForUpdate"},
    "ServerApp": {"open_browser": False, "allow_remote_access": False},
}
# User settings: no "Would you like to get notified about news?" toast over the notebook.
USER_SETTINGS = {"@jupyterlab/apputils-extension/notification.jupyterlab-settings":
                 {"fetchNews": "false", "checkForUpdates": False}}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class JupyterLab:
    """A JupyterLab server on 127.0.0.1 with a random token, serving ``root_dir``; stopped on exit.

    Args:
        root_dir: the folder the server serves (notebook paths are relative to it).
        home: a scratch folder for the server's config, settings, runtime files and log.
        env: extra environment for the server and the kernels it starts.
    """

    def __init__(self, root_dir: Path, home: Path, env: dict | None = None):
        self.root_dir, self.home = Path(root_dir), Path(home)
        self.port, self.token = free_port(), secrets.token_hex(16)
        self.env = dict(env or {})
        self.log_path = self.home / "jupyterlab.log"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> JupyterLab:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _environment(self) -> dict:
        env = {**os.environ, **self.env}
        # What a user gets: the kernel's own inline backend (the nbval conftest sets Agg for its run).
        env.pop("MPLBACKEND", None)
        # The kernel is this virtualenv's python, found on PATH as a user's `jupyter lab` would.
        env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
        for var, sub in (("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_DATA_DIR", "data"),
                         ("JUPYTER_RUNTIME_DIR", "runtime"), ("IPYTHONDIR", "ipython")):
            env[var] = str(self.home / sub)
        return env

    def start(self, timeout_s: float = 60) -> None:
        """Start the server and wait until its API answers."""
        (self.home / "config").mkdir(parents=True, exist_ok=True)
        (self.home / "config" / "jupyter_server_config.json").write_text(json.dumps(SERVER_CONFIG))
        for name, values in USER_SETTINGS.items():
            path = self.home / "settings" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(values))
        cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
               f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0",
               f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={self.root_dir}",
               f"--LabApp.user_settings_dir={self.home / 'settings'}",
               f"--LabApp.workspaces_dir={self.home / 'workspaces'}", "--ServerApp.terminals_enabled=False",
               "--ServerApp.log_level=DEBUG"]  # every request in the log, read only when a test fails
        if os.geteuid() == 0:  # CI runs as root; the server refuses that unless told
            cmd.append("--allow-root")
        atexit.register(self.stop)  # should the fixture's teardown never run
        with open(self.log_path, "wb") as log:
            # Its own process group, so that stop() can end the server and anything it left behind.
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self._environment(),
                                         start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with status {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self.api("GET", "status")
                return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"JupyterLab did not answer on port {self.port} within {timeout_s:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """Shut the kernels and the server down: politely through the API, then by signal. Idempotent."""
        if not self.running:
            return
        try:
            self.api("POST", "shutdown")  # shuts every kernel down, then the server
        except OSError:
            pass  # not answering: the signals below end it
        for sig, wait_s in ((None, 20), (signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            if sig is not None:
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
            try:
                self.proc.wait(wait_s)
                break
            except subprocess.TimeoutExpired:
                continue

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def folder_report(self) -> str:
        """What ``root_dir`` holds now, and the server's log lines about contents (its log is at DEBUG)."""
        held = sorted(p.name for p in self.root_dir.iterdir()) if self.root_dir.is_dir() else "the folder is gone"
        lines = self.log_path.read_text(errors="replace").splitlines() if self.log_path.exists() else []
        contents = [line for line in lines if "/api/contents" in line or "rror" in line][-40:]
        return f"root_dir {self.root_dir} holds: {held}\nserver log, contents requests and errors:\n" + "\n".join(contents)

    def url(self, notebook: str) -> str:
        """The page that opens ``notebook`` (relative to ``root_dir``) in a fresh workspace."""
        return f"http://127.0.0.1:{self.port}/lab/tree/{notebook}?reset&token={self.token}"

    def api(self, method: str, path: str, timeout_s: float = 10):
        """Call the server's REST API (``/api/<path>``); returns the decoded JSON reply, or None."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/api/{path}", method=method,
                                         headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=timeout_s) as reply:
            body = reply.read()
        return json.loads(body) if body else None


class NotebookPage:
    """One notebook open in JupyterLab: run it, find its cells, take screenshots.

    Args:
        page: a Playwright page showing ``lab.url(path)``.
        path: the notebook's path relative to the server's ``root_dir``.
        shots_dir: where screenshots go; their paths are collected in ``shots``.
        run_dir: the notebook's run folder (its ``run_dir`` setting), where its figures are saved.
    """

    def __init__(self, page, lab: JupyterLab, path: str, shots_dir: Path, run_dir: Path | None = None):
        self.page, self.lab, self.path, self.shots_dir, self.run_dir = page, lab, path, Path(shots_dir), run_dir
        self.shots: list[Path] = []

    def screenshot(self, label: str, locator=None) -> Path:
        """A PNG of the page (or of ``locator``) under ``shots_dir``; its path is kept in ``shots``."""
        path = self.shots_dir / f"{Path(self.path).stem}-{len(self.shots):02d}-{label}.png"
        if locator is not None:  # whole, not cut by the notebook's own scrolling panel
            locator.evaluate("element => element.scrollIntoView({block: 'center'})")
        (locator or self.page).screenshot(path=str(path), **({} if locator else {"full_page": True}))
        self.shots.append(path)
        return path

    def fail(self, message: str):
        """Raise an AssertionError with ``message`` and a screenshot of the page as it is."""
        try:
            shot = f"screenshot: {self.screenshot('failure')}"
        except Exception as e:  # the page may be gone; the message must still get out
            shot = f"no screenshot ({type(e).__name__}: {e})"
        raise AssertionError(f"{message}\n{shot}\nJupyterLab log (tail):\n{self.lab.log_tail(1500)}")

    def code_cell(self, title: str):
        """The code cell whose source contains ``title`` (for example ``"#@title 8. Curves"``)."""
        return self.page.locator(".jp-CodeCell").filter(has_text=title)

    def image_in_cell(self, title: str):
        """The output area of the cell titled ``title`` and the decoded (width, height) of its one image."""
        output = self.code_cell(title).locator(".jp-OutputArea")
        image = output.locator("img")
        image.first.wait_for(timeout=10_000)
        if image.count() != 1:
            self.fail(f"{title}: expected one image in its output, found {image.count()}")
        image.scroll_into_view_if_needed()
        return output, tuple(image.evaluate("img => [img.naturalWidth, img.naturalHeight]"))

    def prompts(self) -> list[str]:
        # textContent: cells scrolled out of view (content-visibility) have no innerText
        return [t.strip() for t in self.page.locator(".jp-CodeCell .jp-InputPrompt").all_text_contents()]

    def wait_for_kernel(self, timeout_s: float = 60) -> None:
        """Wait until the notebook is shown and its kernel is connected and idle.

        .. note:: Run All clicked earlier opens JupyterLab's "Select Kernel" dialog instead.
        """
        try:
            self.page.locator(".jp-Notebook .jp-CodeCell").first.wait_for(state="visible", timeout=timeout_s * 1000)
            self.page.locator(".jp-StatusBar-TextItem", has_text=re.compile(r"\| Idle$")).wait_for(
                timeout=timeout_s * 1000)
        except Exception as e:  # Playwright's TimeoutError; reported with a screenshot
            self.fail(f"{self.path}: the notebook or its kernel did not come up within {timeout_s:.0f} s ({e})")

    def menu(self, menu: str, item: str) -> None:
        """Click ``menu`` in the menu bar, then its item labelled ``item``."""
        exactly = {menu: re.compile(rf"^{re.escape(menu)}$"), item: re.compile(rf"^{re.escape(item)}$")}
        try:
            self.page.locator(".lm-MenuBar-item", has_text=exactly[menu]).click(timeout=10_000)
            label = self.page.locator(".lm-Menu-itemLabel", has_text=exactly[item])
            self.page.locator(".lm-Menu-item:not(.lm-mod-disabled)", has=label).click(timeout=10_000)
        except Exception as e:  # Playwright's TimeoutError; reported with a screenshot
            self.fail(f"{self.path}: could not click {menu} > {item} ({e})")

    def run_all(self, timeout_s: float) -> float:
        """Run > Run All Cells, as a user would; wait until no cell is running. Returns the seconds taken."""
        start = time.monotonic()
        self.menu("Run", "Run All Cells")
        deadline = start + timeout_s
        started = False
        while time.monotonic() < deadline:
            prompts = self.prompts()
            started = started or any(p != "[ ]:" for p in prompts)
            if started and "[*]:" not in prompts:
                return time.monotonic() - start
            time.sleep(0.5)
        self.fail(f"{self.path}: Run All Cells had not finished after {timeout_s:.0f} s; prompts {self.prompts()}")

    def saved(self) -> dict:
        """File > Save Notebook, then the notebook as written to disk (outputs included).

        Read from disk once the save is over (the file's mtime moved and jupyter_server's intermediate
        ``.~<name>`` is gone), never through the contents API while it writes: a GET that meets a
        half-written notebook makes the server move it to ``<name>.invalid`` and put the intermediate
        back, racing the writer, and the notebook vanished ("File Save Error ... No such file") in
        about 1 of 3 runs on a busy machine.
        """
        import nbformat

        file = self.lab.root_dir / self.path
        intermediate = file.with_name(".~" + file.name)
        before = file.stat().st_mtime_ns
        self.menu("File", "Save Notebook")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                if file.stat().st_mtime_ns != before and not intermediate.exists():
                    return nbformat.reads(file.read_text(encoding="utf-8"), as_version=4)
            except FileNotFoundError:
                self.fail(f"{self.path}: gone after File > Save Notebook. {self.lab.folder_report()}")
            time.sleep(0.3)
        self.fail(f"{self.path}: File > Save Notebook did not write the file within 15 s. {self.lab.folder_report()}")


def error_outputs(book: dict) -> list[str]:
    """``"cell N (first line): EName: value"`` for each error output of a saved notebook."""
    return [f"cell {i} ({cell['source'].splitlines()[0]}): {out['ename']}: {out['evalue']}"
            for i, cell in enumerate(book["cells"]) if cell["cell_type"] == "code"
            for out in cell.get("outputs", []) if out["output_type"] == "error"]


def unexecuted_cells(book: dict) -> list[str]:
    """The first line of each code cell of a saved notebook that has no execution count."""
    return [cell["source"].splitlines()[0] for cell in book["cells"]
            if cell["cell_type"] == "code" and cell.get("execution_count") is None]


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG file, from its IHDR chunk."""
    header = Path(path).read_bytes()[:24]
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")
