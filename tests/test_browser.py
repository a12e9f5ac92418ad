"""The quickstart notebook in a real JupyterLab, driven by a real (headless) Chromium.

Run All must draw the DAG and colour every stage done in the live widget. Set
`PIPEKIT_SCREENSHOTS=docs/img` (relative to the repo) to refresh the screenshot the docs show.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
STAGES = 9  # the cancer pipeline


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[tuple[str, str, Path]]:
    """A JupyterLab server on 127.0.0.1 serving a copy of the notebooks: (url, token, root)."""
    root = tmp_path / "notebooks"
    shutil.copytree(REPO / "notebooks", root)
    home = tmp_path / "jupyter"
    port, token = free_port(), secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(
        JUPYTER_CONFIG_DIR=str(home / "config"),
        JUPYTER_RUNTIME_DIR=str(home / "runtime"),
        JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"),
        JUPYTERLAB_SETTINGS_DIR=str(home / "settings"),
    )
    news = (
        home
        / "settings"
        / "@jupyterlab"
        / "apputils-extension"
        / "notification.jupyterlab-settings"
    )
    news.parent.mkdir(parents=True)
    news.write_text('{"fetchNews": "false", "checkForUpdates": false}')  # no toast, no network
    log = (tmp_path / "lab.log").open("wb")
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "jupyter"),
            "lab",
            "--no-browser",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={port}",
            "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={root}",
            "--LabApp.news_url=",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            "--LabApp.extension_manager=readonly",
            "--ServerApp.terminals_enabled=False",
            "--LabApp.expose_app_in_browser=True",  # window.jupyterapp: drive commands, not menus
            *(["--allow-root"] if os.geteuid() == 0 else []),
        ],
        cwd=root,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        for _ in range(300):
            if proc.poll() is not None:
                pytest.fail(f"jupyter lab exited: {(tmp_path / 'lab.log').read_text()[-2000:]}")
            try:
                if requests.get(f"{url}/api/status?token={token}", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"jupyter lab not up in 60 s: {(tmp_path / 'lab.log').read_text()}")
            time.sleep(0.2)
        yield url, token, root
    finally:
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=wait)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        log.close()


def run_all_cells(page: Any, prompts: Any) -> None:
    """JupyterLab's own `notebook:run-all-cells` command (what the Run menu calls), through
    its command registry: no menu to click on a slow machine. Again if a just-connected
    kernel dropped the request."""
    page.wait_for_function(
        "() => window.jupyterapp && window.jupyterapp.commands"
        " && window.jupyterapp.commands.isEnabled('notebook:run-all-cells')",
        timeout=90_000,
    )
    for _attempt in range(3):
        page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
        for _ in range(40):  # up to 20 s for the first cell to be queued or run
            if any(text.strip() != "[ ]:" for text in prompts.all_inner_texts()):
                return
            page.wait_for_timeout(500)
    pytest.fail("Run All Cells did not start the notebook (3 attempts)")


def status_idle(status: Any) -> bool:
    return status.get_attribute("data-status") == "idle"


def resume_from(page: Any, index: int) -> None:
    """Run the cells from `index` on (JupyterLab's `notebook:run-all-below`)."""
    page.evaluate(
        "i => { const nb = window.jupyterapp.shell.currentWidget.content;"
        " nb.activeCellIndex = i;"
        " return window.jupyterapp.commands.execute('notebook:run-all-below'); }",
        index,
    )


def test_run_all_colours_the_live_dag(lab, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `make setup` installs it (Debian package chromium)")
    from playwright.sync_api import expect, sync_playwright

    url, token, _root = lab
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            page.set_default_timeout(60_000)
            page.goto(f"{url}/lab/tree/01-quickstart.ipynb?token={token}")
            notebook = page.locator(".jp-NotebookPanel .jp-Notebook")
            expect(notebook).to_be_visible()
            status = page.locator(".jp-NotebookPanel .jp-Notebook-ExecutionIndicator")
            expect(status).to_have_attribute("data-status", "idle", timeout=90_000)

            cells = json.loads((REPO / "notebooks" / "01-quickstart.ipynb").read_text())["cells"]
            count = sum(c["cell_type"] == "code" for c in cells)
            expect(notebook.locator(".jp-CodeCell")).to_have_count(count)
            prompts = notebook.locator(".jp-CodeCell .jp-InputArea-prompt")
            run_all_cells(page, prompts)

            # every code cell gets an execution count, i.e. the whole notebook ran
            # every code cell gets an execution count, i.e. the whole notebook ran; on a busy
            # machine a request can be dropped while the kernel settles: when nothing moves
            # for 20 s and the kernel is idle, run again from the first cell that never ran
            deadline = time.monotonic() + 240
            seen, moved, resumes = None, time.monotonic(), 0
            while time.monotonic() < deadline:
                texts = prompts.all_inner_texts()
                if len(texts) == count and all(t.strip()[1:-2].isdigit() for t in texts):
                    break
                if texts != seen:
                    seen, moved = texts, time.monotonic()
                elif time.monotonic() - moved > 20 and resumes < 3 and status_idle(status):
                    resume_from(page, [t.strip() for t in texts].index("[ ]:"))
                    resumes, moved = resumes + 1, time.monotonic()
                page.wait_for_timeout(500)
            else:
                page.screenshot(path=str(tmp_path / "timeout.png"))
                pytest.fail(f"notebook did not finish in 240 s: prompts {texts}")
            assert not notebook.locator(".jp-OutputArea-output[data-mime-type*=error]").count()

            # `p` displays as the drawn DAG
            drawn = notebook.locator(".jp-RenderedSVG, .jp-RenderedImage").first
            expect(drawn).to_be_visible()

            # the live widget of `p.run()`: an inline SVG with every stage node done
            live = notebook.locator(".pipekit-dag").first
            expect(live.locator("svg")).to_be_visible()
            done = live.locator("g.node.stage.done")
            expect(done).to_have_count(STAGES)
            assert live.locator("g.node.stage.running, g.node.stage.pending").count() == 0
            filled = done.evaluate_all(
                "nodes => nodes.map(n => [...n.querySelectorAll('path')]"
                ".some(p => p.getAttribute('fill') === '#c8e6c9'))"  # viz.STATE_COLORS["done"]
            )
            assert filled == [True] * STAGES
            table = notebook.locator("table.pipekit-stages").first
            expect(table.locator("tr.pipekit-stage.done")).to_have_count(STAGES)
            expect(notebook.get_by_text("9 done in", exact=False).first).to_be_visible()

            widget = live.locator("xpath=ancestor::div[contains(@class,'widget-vbox')][1]")
            widget.scroll_into_view_if_needed()
            shot = tmp_path / "live-dag.png"
            widget.screenshot(path=str(shot))
            assert shot.read_bytes().startswith(b"\x89PNG")
            target = os.environ.get("PIPEKIT_SCREENSHOTS")
            if target:  # relative to the repository (tests run in a tmp working directory)
                folder = REPO / target
                folder.mkdir(parents=True, exist_ok=True)
                shutil.copy(shot, folder / "live-dag.png")
        finally:
            browser.close()
