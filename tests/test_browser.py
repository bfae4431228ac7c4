"""The chat panel in a real browser: JupyterLab on loopback, Debian's Chromium driven by Playwright.

Skipped when Chromium or Playwright is missing, unless QWEN_LAB_REQUIRE_BROWSER=1 (as in .ci/run),
which turns the skip into a failure. The screenshot lands in artifacts/chat_panel.png.
"""
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ROOT / "artifacts"


def need(condition, why):
    if not condition:
        if os.environ.get("QWEN_LAB_REQUIRE_BROWSER") == "1":
            pytest.fail(f"browser test required but {why}")
        pytest.skip(why)


@contextlib.contextmanager
def jupyterlab(root: Path):
    """JupyterLab serving ``root`` on loopback, without a token, its config (and user settings) in ``root/.jupyter``;
    yields its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, QWEN_LAB_MODEL="qwen-lab/tiny-chat", HF_HUB_OFFLINE="1",
               JUPYTER_CONFIG_DIR=str(root / ".jupyter"), JUPYTER_RUNTIME_DIR=str(root / ".runtime"))
    log = open(root / "lab.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root", "--ip=127.0.0.1",
         f"--port={port}", "--IdentityProvider.token=", "--ServerApp.password=",
         "--ServerApp.disable_check_xsrf=True", f"--ServerApp.root_dir={root}",
         "--LabApp.news_url=", "--LabServerApp.extension_manager=readonly"],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{url}/api/status", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("JupyterLab did not start: " + (root / "lab.log").read_text()[-2000:])
        yield url
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def chromium(p):
    """Debian's Chromium, headless, launched by Playwright's ``p`` (without its network chatter)."""
    return p.chromium.launch(
        executable_path=CHROMIUM, headless=True,
        args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
              "--disable-background-networking", "--disable-component-update"])


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    need(Path(CHROMIUM).exists(), f"{CHROMIUM} is missing (apt-get install chromium)")
    root = tmp_path_factory.mktemp("lab")
    shutil.copy(ROOT / "notebooks" / "07_chat_panel.ipynb", root)  # a copy: autosave never touches the repo
    with jupyterlab(root) as url:
        yield url


def test_chat_panel_streams_and_stops_in_chromium(lab):
    sync_api = pytest.importorskip("playwright.sync_api")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = chromium(p)
        page = browser.new_page(viewport={"width": 1300, "height": 1100})
        try:
            page.goto(f"{lab}/lab/tree/07_chat_panel.ipynb", wait_until="domcontentloaded")
            page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=90_000)
            # wait for the kernel to be idle, then click into a cell so the keyboard goes to the notebook
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=90_000)
            panels = page.locator(".qwen-lab-chat-panel")
            for attempt in range(3):  # on a loaded machine a first Run All can land before the kernel is ready
                page.locator(".jp-NotebookPanel .jp-Cell").first.click()
                page.get_by_role("menuitem", name="Run", exact=True).click()
                page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
                try:
                    panels.nth(1).wait_for(timeout=90_000)
                    break
                except sync_api.TimeoutError:
                    if attempt == 2:
                        raise
            # the notebook's own scripted exchange has run in the kernel:
            page.get_by_text("the two panels share one loaded model: True").wait_for(timeout=120_000)

            # --- panel 1: type a question, press Send, the reply appears
            first = panels.nth(0)
            first.locator("input[type='text']").fill("What is the capital of Japan?")
            first.get_by_role("button", name="Send").click()
            first.locator(".ql-assistant", has_text="Tokyo").first.wait_for(timeout=60_000)

            # --- Show inside: the exact prompt and each token's probability, under the next reply
            first.get_by_text("Settings").click()
            first.get_by_label("Show inside: the exact prompt, and each token's probability").check()
            first.locator("input[type='text']").fill("What is the capital of France?")
            first.get_by_role("button", name="Send").click()
            inside = first.locator("details.ql-inside")
            inside.first.wait_for(timeout=60_000)
            inside.first.locator("summary").click()
            assert inside.first.locator(".ql-special", has_text="<|im_start|>").count() >= 2  # marked, escaped
            token = inside.first.locator(".ql-tok[title*='likeliest']").first
            token.hover()
            assert token.get_attribute("title").startswith("p = ")
            assert "ended: the model wrote <|im_end|>" in inside.first.locator("summary").inner_text()
            page.screenshot(path=str(ARTIFACTS / "chat_panel_inside.png"), full_page=True)

            # --- panel 2 never stops by itself: the reply streams and grows until Stop
            second = panels.nth(1)
            second.locator("input[type='text']").fill("Tell me about the KV cache.")
            second.locator("input[type='text']").press("Enter")
            streaming = second.locator(".ql-streaming")
            streaming.wait_for(timeout=60_000)
            sizes = []
            for _ in range(40):
                sizes.append(len(streaming.inner_text()) if streaming.count() else -1)
                if len([s for s in sizes if s > 0]) >= 3 and sizes[-1] > sizes[0] > 0:
                    break
                page.wait_for_timeout(50)
            assert sizes[-1] > sizes[0] > 0, f"the reply did not grow: {sizes}"
            page.screenshot(path=str(ARTIFACTS / "chat_panel_streaming.png"), full_page=True)
            second.get_by_role("button", name="Stop").click()
            second.locator(".ql-meta", has_text="stopped").wait_for(timeout=10_000)
            stopped_text = second.locator(".ql-assistant").last.inner_text()
            page.wait_for_timeout(700)
            assert second.locator(".ql-assistant").last.inner_text() == stopped_text  # nothing more arrives
            assert second.locator(".ql-streaming").count() == 0
            page.screenshot(path=str(ARTIFACTS / "chat_panel.png"), full_page=True)
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "chat_panel_failure.png"), full_page=True)
            raise
        finally:
            browser.close()


@pytest.mark.parametrize("setting", [True, False], ids=["workshop-setting", "jupyterlab-default"])
def test_closing_a_notebook_tab_shuts_its_kernel_down_with_the_workshop_s_setting(tmp_path, setting):
    """workshop/learner_start.py writes JupyterLab's setting that shuts a kernel down with its notebook's tab
    (each idle kernel keeps ~0.3 GiB of a room's memory); without it the kernel stays. Seen here in a browser."""
    need(Path(CHROMIUM).exists(), f"{CHROMIUM} is missing (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    from test_workshop_hub import learner_start
    if setting:
        assert learner_start.shut_kernels_down_on_close(tmp_path / ".jupyter" / "lab" / "user-settings")
    (tmp_path / "n.ipynb").write_text(json.dumps({
        "cells": [{"cell_type": "code", "metadata": {}, "source": "1 + 1", "outputs": [], "execution_count": None,
                   "id": "c0"}],
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
        "nbformat": 4, "nbformat_minor": 5}))

    def kernels(url):
        with urllib.request.urlopen(f"{url}/api/kernels", timeout=10) as r:
            return json.load(r)

    with jupyterlab(tmp_path) as url, sync_api.sync_playwright() as p:
        browser = chromium(p)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            page.goto(f"{url}/lab/tree/n.ipynb", wait_until="domcontentloaded")
            deadline = time.time() + 90  # the notebook's kernel starts
            while not kernels(url) and time.time() < deadline:
                time.sleep(0.5)
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=90_000)
            assert len(kernels(url)) == 1
            tab = page.locator(".lm-DockPanel-tabBar .lm-TabBar-tab", has_text="n.ipynb")
            tab.locator(".lm-TabBar-tabCloseIcon").click()
            discard = page.locator(".jp-Dialog").get_by_role("button", name="Discard")  # "Save your work?"
            try:
                discard.click(timeout=5_000)
            except sync_api.TimeoutError:
                pass  # closed without asking
            tab.wait_for(state="detached", timeout=10_000)  # the tab really closed
            deadline = time.time() + 15  # a shutdown takes a second or two
            while kernels(url) and time.time() < deadline:
                time.sleep(0.5)
            left = kernels(url)
        finally:
            browser.close()
    assert len(left) == (0 if setting else 1), left
