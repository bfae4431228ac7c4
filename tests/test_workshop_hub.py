"""The workshop's JupyterHub, for real: learners log in with the room's password, start their servers,
and each runs a chat turn in a kernel, the model read from one shared, read-only cache.

The hub is ``workshop/jupyterhub_config.py`` as an instructor runs it, on 127.0.0.1 (free ports),
its proxy npm's configurable-http-proxy from ``workshop/node_modules`` (``make workshop-proxy``).
The model is the embedded tiny-chat, served by ``LocalHub`` as ``workshop/tiny-chat`` and put into
the shared cache by ``qwen-lab download --cache-dir``, exactly as a room's cache is filled. Needs
JupyterHub (the ``workshop`` extra) and the proxy: skipped without them, unless
QWEN_LAB_REQUIRE_HUB=1 (as in .ci/run), which makes the skip a failure.

Also here: bad settings each get one line, and ``workshop/z2jh/`` agrees with the tested config.
"""
import importlib.util
import json
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import files_cut_at
from qwen_lab.hub import EMBEDDED_MODEL_DIR
from qwen_lab.hub_server import LocalHub

ROOT = Path(__file__).resolve().parents[1]
WORKSHOP = ROOT / "workshop"
CONFIG = WORKSHOP / "jupyterhub_config.py"
JUPYTERHUB = Path(sys.executable).with_name("jupyterhub")
REPO_ID = "workshop/tiny-chat"
PASSWORD = "the-room-password"
#: Each learner asks their own question and must get the embedded model's answer to it.
LEARNERS = {
    "ada": ("What is the capital of France?", "Paris"),
    "grace": ("What is the capital of Italy?", "Rome"),
    "alan": ("What is the capital of Japan?", "Tokyo"),
    "katherine": ("What is 7 plus 5?", "12"),
}
ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0


def load_room():
    """workshop/room.py, imported from its file (it is not part of the package)."""
    spec = importlib.util.spec_from_file_location("workshop_room", WORKSHOP / "room.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


room = load_room()
_spec = importlib.util.spec_from_file_location("learner_start", WORKSHOP / "learner_start.py")
learner_start = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(learner_start)


def need(condition, why):
    if not condition:
        if os.environ.get("QWEN_LAB_REQUIRE_HUB") == "1":
            pytest.fail(f"the workshop hub test is required but {why}")
        pytest.skip(why)


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def tree(folder: Path) -> dict:
    """Every entry under ``folder``: its kind, size, mode and modification time, to tell if anything changed."""
    entries = {}
    for path in sorted(folder.rglob("*")):
        info = path.lstat()
        entries[str(path.relative_to(folder))] = (stat.S_IFMT(info.st_mode), info.st_size, stat.S_IMODE(info.st_mode),
                                                  info.st_mtime_ns)
    return entries


def hub_environment(tmp: Path, cache: Path, **more) -> dict:
    """The hub's environment: this one without qwen-lab's and Hugging Face's settings, plus the room's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QWEN_LAB_", "HF_", "JUPYTERHUB_", "JPY_"))}
    env.update(QWEN_LAB_HUB_PASSWORD=PASSWORD, QWEN_LAB_HUB_CACHE=str(cache), QWEN_LAB_MODEL=REPO_ID,
               QWEN_LAB_HUB_REAL_MODELS=REPO_ID,  # the room's real model, here served by LocalHub into the cache
               QWEN_LAB_HUB_LEARNERS=str(len(LEARNERS)), QWEN_LAB_HUB_STATE=str(tmp / "state"),
               QWEN_LAB_HUB_HOMES=str(tmp / "homes" / "{username}"))
    if ROOT_USER:  # this sandbox runs as root: the config refuses that unless told it is a throwaway machine
        env["QWEN_LAB_HUB_ALLOW_ROOT"] = "1"
    env.update(more)
    return {k: v for k, v in env.items() if v is not None}  # None: not set at all


# ---------------------------------------------------------------- the shared cache, filled as a room's is

@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A Hugging Face cache holding workshop/tiny-chat, filled by `qwen-lab download --cache-dir`, then made read-only."""
    folder = tmp_path_factory.mktemp("room") / "hf-cache"
    env = dict(os.environ, HF_HUB_OFFLINE="0", HF_HUB_DISABLE_PROGRESS_BARS="1")
    with LocalHub({REPO_ID: EMBEDDED_MODEL_DIR}) as hub:
        env["HF_ENDPOINT"] = hub.url
        done = subprocess.run([str(Path(sys.executable).with_name("qwen-lab")), "download", "--cache-dir",
                               str(folder), REPO_ID], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    snapshot = Path(done.stdout.strip())
    assert snapshot.parent.parent == folder / "models--workshop--tiny-chat"
    for path in [folder, *folder.rglob("*")]:  # read-only, as the room's cache is
        if not path.is_symlink():
            path.chmod(0o555 if path.is_dir() else 0o444)
    yield folder
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() else 0o644)


@pytest.fixture(scope="module")
def kernel_cache(cache, tmp_path_factory):
    """The room's kernel cache, filled by `qwen-lab tune` for the room's model and the learners' threads, as the
    instructor fills it, then made read-only."""
    folder = tmp_path_factory.mktemp("room") / "kernel-cache"
    threads = room.threads_per_learner(room.usable_cores(), len(LEARNERS))
    env = {k: v for k, v in os.environ.items() if not k.startswith("QWEN_LAB_")}
    done = subprocess.run([str(Path(sys.executable).with_name("qwen-lab")), "tune", "--kernel-cache", str(folder),
                           "--threads", str(threads), "--cache-dir", str(cache), REPO_ID],
                          env=dict(env, HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    yield folder
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


def weights_blob(cache: Path) -> Path:
    """The one file holding the model's weights in the cache (a snapshot's link resolved to its blob)."""
    [snapshot] = (cache / "models--workshop--tiny-chat" / "snapshots").iterdir()
    return (snapshot / "model.safetensors").resolve()


# ---------------------------------------------------------------- the hub

class Hub:
    def __init__(self, url: str, process: subprocess.Popen, folder: Path):
        self.url, self.process, self.folder = url, process, folder
        self.pids: set[int] = set()  # learners' servers and kernels seen: all must be gone at the end

    def log(self) -> str:
        return (self.folder / "hub.log").read_text(errors="replace")[-4000:]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"  # a zombie is already dead
    except (OSError, IndexError):
        return False


@pytest.fixture(scope="module")
def hub(cache, kernel_cache, tmp_path_factory):
    need(importlib.util.find_spec("jupyterhub") is not None and JUPYTERHUB.exists(),
         "JupyterHub is not installed (pip install -e '.[workshop]')")
    need(room.LOCAL_PROXY.exists(), f"{room.LOCAL_PROXY} is missing (make workshop-proxy)")
    need(importlib.util.find_spec("requests") and importlib.util.find_spec("websocket"),
         "requests or websocket-client is not installed (pip install -e '.[test]')")
    folder = tmp_path_factory.mktemp("hub")
    public, api, proxy_api = free_ports(3)
    url = f"http://127.0.0.1:{public}"
    log = open(folder / "hub.log", "w")
    process = subprocess.Popen(
        [str(JUPYTERHUB), "-f", str(CONFIG), f"--JupyterHub.bind_url={url}",
         f"--JupyterHub.hub_bind_url=http://127.0.0.1:{api}",
         f"--ConfigurableHTTPProxy.api_url=http://127.0.0.1:{proxy_api}"],
        cwd=folder, env=hub_environment(folder, cache, QWEN_LAB_HUB_KERNEL_CACHE=str(kernel_cache)), stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True)
    running = Hub(url, process, folder)
    import requests
    deadline = time.monotonic() + 120
    while True:
        try:
            if requests.get(f"{url}/hub/health", timeout=5).status_code == 200:
                break
        except requests.RequestException:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail("the hub did not start:\n" + running.log())
        time.sleep(0.5)
    proxy_pid = int((folder / "state" / "jupyterhub-proxy.pid").read_text())
    yield running
    # Stopping the hub stops every learner's server (cleanup_servers) and the proxy (cleanup_proxy).
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
    log.close()
    deadline = time.monotonic() + 30
    left = {p for p in running.pids | {proxy_pid} if alive(p)}
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = {p for p in left if alive(p)}
    for pid in left:  # never leave a process behind, even when failing
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left running after the hub stopped: {sorted(left)}\n{running.log()}"


# ---------------------------------------------------------------- a learner, through the hub's and the server's APIs

def log_in(hub: Hub, name: str, password: str):
    """The login form, as a browser posts it; returns the session and the response."""
    import requests
    session = requests.Session()
    session.get(f"{hub.url}/hub/login", timeout=30).raise_for_status()
    xsrf = session.cookies.get("_xsrf", path="/hub/")
    response = session.post(f"{hub.url}/hub/login", data={"username": name, "password": password, "_xsrf": xsrf},
                            allow_redirects=False, timeout=60)
    return session, response


KERNEL_CODE = r"""
import json, os
from qwen_lab import ChatModel, kernels
from qwen_lab.hub import choose_model
from qwen_lab.load import suggested_dtype
MODEL, why = choose_model()                       # as every notebook's first cell does
chat = ChatModel.load(MODEL, dtype=suggested_dtype(MODEL))
reply = chat.generate([{"role": "user", "content": QUESTION}], do_sample=False).text
print(json.dumps({
    "model": MODEL, "why": why, "reply": reply, "pid": os.getpid(), "ppid": os.getppid(),
    "home": os.path.expanduser("~"), "notebooks": sorted(os.listdir(os.path.expanduser("~/notebooks"))),
    "env": {k: os.environ.get(k) for k in ("QWEN_LAB_MODEL", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "QWEN_LAB_THREADS",
                                           "OMP_NUM_THREADS", "QWEN_LAB_SOURCE", "QWEN_LAB_SHARED_CACHE")},
    "threads": kernels.num_threads(), "dtype": str(chat.model.lm_head.weight.dtype),
    "kernels": kernels._library()._name if kernels.available() else None,
    "cache_writable": os.access(os.environ["HF_HUB_CACHE"], os.W_OK),
}))
"""


def execute(ws, code: str, timeout: float) -> tuple[str, dict | None]:
    """Run ``code`` in the kernel behind websocket ``ws``: (its stdout, its error or None)."""
    msg_id, session = uuid.uuid4().hex, uuid.uuid4().hex
    ws.send(json.dumps({
        "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "test", "session": session,
                   "date": "", "version": "5.3"},
        "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
        "content": {"code": code, "silent": False, "store_history": False, "user_expressions": {},
                    "allow_stdin": False, "stop_on_error": True}}))
    out, error, replied, idle = [], None, False, False
    deadline = time.monotonic() + timeout
    while not (replied and idle):
        ws.settimeout(max(1.0, deadline - time.monotonic()))
        message = json.loads(ws.recv())
        if message.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        kind, content = message["msg_type"], message["content"]
        if kind == "stream":
            out.append(content["text"])
        elif kind == "error":
            error = content
        elif kind == "execute_reply":
            replied = True
        elif kind == "status" and content["execution_state"] == "idle":
            idle = True
    return "".join(out), error


def chat_turn(hub: Hub, name: str, question: str) -> dict:
    """Log in, start the server, open a kernel, run a chat turn: what the kernel reported."""
    import requests
    import websocket
    session, response = log_in(hub, name, PASSWORD)
    assert response.status_code == 302, f"{name} could not log in: {response.status_code}"
    token = session.post(f"{hub.url}/hub/api/users/{name}/tokens", json={"note": "test", "expires_in": 900},
                         headers={"X-XSRFToken": session.cookies.get("_xsrf", path="/hub/")},
                         timeout=30).json()["token"]
    api = requests.Session()
    api.headers["Authorization"] = f"token {token}"
    started = api.post(f"{hub.url}/hub/api/users/{name}/server", timeout=200)
    assert started.status_code in (201, 202), started.text
    deadline = time.monotonic() + 240
    while not api.get(f"{hub.url}/hub/api/users/{name}", timeout=30).json()["servers"].get("", {}).get("ready"):
        assert time.monotonic() < deadline, f"{name}'s server did not start:\n{hub.log()}"
        time.sleep(0.5)
    kernel = api.post(f"{hub.url}/user/{name}/api/kernels", json={"name": "python3"}, timeout=60)
    assert kernel.status_code == 201, kernel.text
    ws = websocket.create_connection(
        f"{hub.url.replace('http', 'ws', 1)}/user/{name}/api/kernels/{kernel.json()['id']}/channels",
        header=[f"Authorization: token {token}"], timeout=60)
    try:
        out, error = execute(ws, f"QUESTION = {question!r}\n{KERNEL_CODE}", timeout=300)
    finally:
        ws.close()
    assert error is None, f"{name}'s kernel failed: {error['ename']}: {error['evalue']}"
    report = json.loads(out.strip().splitlines()[-1])
    hub.pids.update({report["pid"], report["ppid"]})  # the kernel, and the learner's server that started it
    report["maps"] = Path(f"/proc/{report['pid']}/maps").read_text()  # read from outside, while it runs
    report["stop"] = api.delete(f"{hub.url}/hub/api/users/{name}/server", timeout=120).status_code
    return report


def kit_files() -> dict:
    """The kit's files that learners' servers and kernels run or open (Python's own __pycache__ aside: these
    tests run as root, so a fresh clone's first import writes one, changing its folder's modification time;
    the folders are compared by kind and mode only)."""
    return {f"{name}/{path}": entry if stat.S_ISREG(entry[0]) else entry[:1] + entry[2:3]
            for name in room.KIT_PARTS if (ROOT / name).is_dir()
            for path, entry in tree(ROOT / name).items() if "__pycache__" not in path}


def test_four_learners_chat_from_one_shared_read_only_cache(hub, cache, kernel_cache):
    before, kit_before, kernels_before = tree(cache), kit_files(), tree(kernel_cache)
    with ThreadPoolExecutor(len(LEARNERS)) as pool:  # the room logs in at once
        reports = dict(zip(LEARNERS, pool.map(lambda name: chat_turn(hub, name, LEARNERS[name][0]), LEARNERS)))
    blob = weights_blob(cache)
    threads = room.threads_per_learner(room.usable_cores(), len(LEARNERS))
    notebooks = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))
    chinese = sorted(p.name for p in (ROOT / "notebooks" / "zh-TW").glob("*.ipynb"))
    for name, report in reports.items():
        assert LEARNERS[name][1] in report["reply"], (name, report["reply"])
        assert report["model"] == REPO_ID and report["why"] == "chosen by QWEN_LAB_MODEL"
        assert report["env"] == {"QWEN_LAB_MODEL": REPO_ID, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache),
                                 "QWEN_LAB_THREADS": str(threads), "OMP_NUM_THREADS": str(threads),
                                 "QWEN_LAB_SOURCE": str(ROOT), "QWEN_LAB_SHARED_CACHE": str(kernel_cache)}
        assert report["threads"] == threads  # (JupyterHub passes on only what it is given)
        # the decode kernels: the room's build, used as it is (none compiled at once by four learners)
        assert report["kernels"] is None or Path(report["kernels"]).parent == kernel_cache
        # their own folder, with their own copy of every notebook, the glossary and the Chinese edition;
        # not the solutions (QWEN_LAB_HUB_SOLUTIONS is not set)
        home = hub.folder / "homes" / name
        assert report["home"] == str(home) and report["notebooks"] == sorted(notebooks + ["GLOSSARY.md", "zh-TW"])
        assert sorted(p.name for p in (home / "notebooks").glob("*.ipynb")) == notebooks
        assert sorted(p.name for p in (home / "notebooks" / "zh-TW").glob("*.ipynb")) == chinese == notebooks
        # the weights are the cache's one file, memory-mapped (bf16, the file's own dtype: no private copy)
        mapped = {line.split(None, 5)[5] for line in report["maps"].splitlines() if len(line.split(None, 5)) == 6}
        assert str(blob) in mapped, f"{name}'s kernel does not map {blob}"
        assert not [m for m in mapped if m.endswith(".safetensors") or ("/blobs/" in m and m != str(blob))], mapped
        assert report["dtype"] == "torch.bfloat16"
        if not ROOT_USER:  # root writes anywhere; anyone else cannot write the shared cache
            assert report["cache_writable"] is False
        assert report["stop"] in (202, 204)
    # each learner's server stops kernels left idle and disconnected, and a closed notebook tab shuts its kernel down
    log = (hub.folder / "hub.log").read_text(errors="replace")
    culling = (f"Culling kernels with idle durations > {learner_start.CULL_IDLE_SECONDS} seconds at 300 second "
               f"intervals")
    assert log.count(culling) >= len(LEARNERS), log[-4000:]
    setting, values = learner_start.KERNEL_SHUTDOWN_SETTING
    for name in LEARNERS:
        path = hub.folder / "homes" / name / ".jupyter" / "lab" / "user-settings" / setting
        assert json.loads(path.read_text()) == values
    # nothing wrote into the cache, nor into the kit (so it can be read-only to them), and no learner has a copy
    # of the model of their own
    assert tree(cache) == before and tree(kernel_cache) == kernels_before
    assert kit_files() == kit_before
    homes = hub.folder / "homes"
    assert not [p for p in homes.rglob("*") if p.name.endswith(".safetensors") or p.name.startswith("models--")]
    assert not list(homes.rglob("kernels-*.so"))  # no learner compiled the kernels of their own


def test_the_hub_warns_at_start_when_learners_could_change_the_kit_or_the_cache(hub, cache):
    log = (hub.folder / "hub.log").read_text(errors="replace")
    kit = room.writable_kit_warning(ROOT)  # a checkout is its owner's to write; the room's kit is root's
    assert (f"jupyterhub_config.py: warning: {kit}\n" in log) if kit else "warning: the kit" not in log
    cache_is_writable = os.access(cache, os.W_OK)  # root writes anywhere; anyone else cannot write this cache
    assert (f"jupyterhub_config.py: warning: the shared cache {cache} is writable by the learners" in log) \
        is cache_is_writable


def test_the_hub_finds_the_room_s_kernel_cache_prepared(hub, kernel_cache):
    log = (hub.folder / "hub.log").read_text(errors="replace")
    assert "warning: the room's kernel cache" not in log or (
        os.access(kernel_cache, os.W_OK) and f"warning: the room's kernel cache {kernel_cache} is writable" in log)


def test_a_wrong_password_or_a_name_that_is_no_folder_name_is_refused(hub):
    _, wrong = log_in(hub, "mallory", "not-the-password")
    _, bad_name = log_in(hub, "../etc", PASSWORD)
    _, right = log_in(hub, "mallory", PASSWORD)
    assert (wrong.status_code, bad_name.status_code, right.status_code) == (403, 403, 302)


# ---------------------------------------------------------------- bad settings: one line each

def run_config(tmp_path, cache, **env) -> subprocess.CompletedProcess:
    need(JUPYTERHUB.exists(), "JupyterHub is not installed (pip install -e '.[workshop]')")
    return subprocess.run([str(JUPYTERHUB), "-f", str(CONFIG), "--JupyterHub.bind_url=http://127.0.0.1:1"],
                          cwd=tmp_path, env=hub_environment(tmp_path, cache, **env), capture_output=True, text=True,
                          timeout=120)


def start_refused(tmp_path, cache, *args, timeout: float = 60, **env) -> subprocess.CompletedProcess:
    """The hub started on free ports (those ``args`` set aside), expected to refuse; one that runs instead is
    stopped as its instructor would stop it (SIGTERM: it stops its proxy too) and the test fails."""
    need(JUPYTERHUB.exists() and room.LOCAL_PROXY.exists(), "JupyterHub or its proxy is not installed")
    ports = dict(zip(("--JupyterHub.bind_url", "--JupyterHub.hub_bind_url", "--ConfigurableHTTPProxy.api_url"),
                     (f"http://127.0.0.1:{port}" for port in free_ports(3))))
    given = {arg.split("=")[0].replace("--port", "--JupyterHub.bind_url") for arg in args}
    process = subprocess.Popen(
        [str(JUPYTERHUB), "-f", str(CONFIG), *(f"{k}={v}" for k, v in ports.items() if k not in given), *args],
        cwd=tmp_path, env=hub_environment(tmp_path, cache, QWEN_LAB_HUB_REAL_MODELS="", **env),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.terminate()
        out, err = process.communicate(timeout=60)
        pytest.fail(f"the hub started instead of refusing:\n{err[-3000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def last_line(done: subprocess.CompletedProcess) -> str:
    return done.stderr.strip().splitlines()[-1]


def test_the_hub_without_npm_s_proxy_says_what_to_do(tmp_path, cache):
    done = run_config(tmp_path, cache, QWEN_LAB_HUB_PROXY=str(tmp_path / "nowhere" / "configurable-http-proxy"))
    assert done.returncode == 1
    assert last_line(done) == (f"jupyterhub_config.py: error: QWEN_LAB_HUB_PROXY={tmp_path}/nowhere/configurable-"
                               f"http-proxy is not an executable file: run `make workshop-proxy` (npm ci in "
                               f"workshop/) or `npm install -g configurable-http-proxy`")
    assert "Traceback" not in done.stderr


def test_the_hub_without_the_model_in_the_cache_says_how_to_fill_it(tmp_path, cache):
    done = run_config(tmp_path, cache, QWEN_LAB_MODEL="Qwen/Qwen2.5-1.5B-Instruct")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert last_line(done).startswith(f"jupyterhub_config.py: error: QWEN_LAB_MODEL: Qwen/Qwen2.5-1.5B-Instruct: "
                                      f"not in the cache {cache}; ")
    assert f"`qwen-lab download --cache-dir {cache} Qwen/Qwen2.5-1.5B-Instruct`" in last_line(done)


def test_the_hub_without_a_real_model_in_the_cache_says_how_to_fill_it(tmp_path, cache):
    """Learners switch to the real models for notebook 07: each must be in the cache before the day starts."""
    done = run_config(tmp_path, cache, QWEN_LAB_MODEL="",
                      QWEN_LAB_HUB_REAL_MODELS=f"{REPO_ID}, Qwen/Qwen2.5-0.5B-Instruct")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert last_line(done).startswith(f"jupyterhub_config.py: error: QWEN_LAB_HUB_REAL_MODELS: "
                                      f"Qwen/Qwen2.5-0.5B-Instruct: not in the cache {cache}; ")
    assert f"`qwen-lab download --cache-dir {cache} Qwen/Qwen2.5-0.5B-Instruct`" in last_line(done)
    # the default real model, not asked for and not in this cache, is refused the same way
    done = run_config(tmp_path, cache, QWEN_LAB_MODEL="", QWEN_LAB_HUB_REAL_MODELS=None)
    assert done.returncode == 1
    assert last_line(done).startswith(f"jupyterhub_config.py: error: QWEN_LAB_HUB_REAL_MODELS: "
                                      f"{room.DEFAULT_REAL_MODELS[0]}: not in the cache {cache}; ")


def test_a_hub_folder_it_cannot_write_is_one_line(tmp_path, cache):
    """A state folder there but unwritable stopped the hub in a traceback (writing its cookie secret); a learners'
    folder so (the same check, QWEN_LAB_HUB_HOMES) failed every learner's server in two tracebacks, the hub
    running. Here the disk is "full": every file stops at 64 KiB (the hub's database needs more)."""
    with files_cut_at(64 << 10):
        done = start_refused(tmp_path, cache)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert last_line(done) == (f"jupyterhub_config.py: error: cannot write into {tmp_path / 'state'} "
                               f"(QWEN_LAB_HUB_STATE): File too large; it must be writable by the user the hub runs "
                               f"as ({pwd.getpwuid(os.geteuid()).pw_name}), on a disk with space left")


def test_a_port_taken_by_another_program_is_one_line(tmp_path, cache):
    """Taken, the learners' port had the hub log that it was running while learners reached the other program;
    the hub's API port, a traceback; the proxy's API port, a traceback ending in that program's "HTTP 404"."""
    with socket.socket() as other:  # another program, listening
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        for option, what, move in (
                ("--port", "the learners' address", "`--port 8002`"),
                ("--JupyterHub.hub_bind_url", "the hub's API", "`--JupyterHub.hub_bind_url=http://127.0.0.1:8091`"),
                ("--ConfigurableHTTPProxy.api_url", "the proxy's API",
                 "`--ConfigurableHTTPProxy.api_url=http://127.0.0.1:8011`")):
            value = str(port) if option == "--port" else f"http://127.0.0.1:{port}"
            done = start_refused(tmp_path, cache, f"{option}={value}")
            assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
            line = last_line(done)  # the address as JupyterHub made it of the option (--port: every interface)
            assert line.startswith(f"jupyterhub_config.py: error: cannot listen on port {port} ({what}, http://")
            assert line.endswith(f"): another program holds it (`ss -ltnp 'sport = :{port}'` names it): stop that "
                                 f"program, or start the hub with {move}")


def test_a_proxy_an_earlier_hub_left_running_holds_no_port_against_the_next(tmp_path):
    """JupyterHub stops the proxy its pid file names before starting its own: that proxy's ports are not refused
    (a hub restarted after a crash would otherwise refuse for good), the hub's own port still is."""
    with socket.socket() as proxy:
        proxy.bind(("127.0.0.1", 0))
        proxy.listen()
        url = f"http://127.0.0.1:{proxy.getsockname()[1]}"
        by_proxy = [room.Address(url, "the learners' address", "`--port 8002`", proxy=True)]
        by_hub = [room.Address(url, "the hub's API", "`--JupyterHub.hub_bind_url=...`", proxy=False)]
        pid_file = tmp_path / "jupyterhub-proxy.pid"
        with pytest.raises(room.RoomError, match="another program holds it"):  # no pid file: another program's
            room.check_ports(by_proxy, pid_file)
        pid_file.write_text(str(os.getpid()))  # a live process (this one) as the earlier hub's proxy
        room.check_ports(by_proxy, pid_file)
        with pytest.raises(room.RoomError, match="another program holds it"):
            room.check_ports(by_hub, pid_file)


def test_learners_start_on_tiny_chat_and_the_real_models_are_the_room_s_choice():
    settings = {"QWEN_LAB_HUB_PASSWORD": PASSWORD}
    default = room.Room.from_environ(settings, cores=8)
    assert default.model == room.DEFAULT_MODEL == "qwen-lab/tiny-chat"  # docs/workshop.md: 01-06 on tiny-chat
    assert room.learner_environment(default)["QWEN_LAB_MODEL"] == "qwen-lab/tiny-chat"
    assert default.real_models == room.DEFAULT_REAL_MODELS == ("Qwen/Qwen2.5-1.5B-Instruct",)
    chosen = room.Room.from_environ({**settings, "QWEN_LAB_MODEL": "Qwen/Qwen2.5-0.5B-Instruct",
                                     "QWEN_LAB_HUB_REAL_MODELS": " Qwen/Qwen2.5-0.5B-Instruct ,Qwen/Qwen3-0.6B,"},
                                    cores=8)
    assert room.learner_environment(chosen)["QWEN_LAB_MODEL"] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert chosen.real_models == ("Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen3-0.6B")
    assert room.Room.from_environ({**settings, "QWEN_LAB_HUB_REAL_MODELS": ""}, cores=8).real_models == ()


def test_learners_read_the_room_s_kernel_cache():
    settings = {"QWEN_LAB_HUB_PASSWORD": PASSWORD}
    default = room.Room.from_environ(settings, cores=8)
    assert room.learner_environment(default)["QWEN_LAB_SHARED_CACHE"] == room.DEFAULT_KERNEL_CACHE
    chosen = room.Room.from_environ({**settings, "QWEN_LAB_HUB_KERNEL_CACHE": "/srv/room/kernels"}, cores=8)
    assert room.learner_environment(chosen)["QWEN_LAB_SHARED_CACHE"] == "/srv/room/kernels"


def test_the_kernel_cache_missing_unprepared_or_writable_is_one_line_saying_the_fix(monkeypatch, tmp_path):
    from qwen_lab import kernels, shared_cache, tuning
    if not kernels.available():
        pytest.skip(f"C kernel: {kernels.status()}")
    folder = tmp_path / "kernel-cache"
    settings = room.Room.from_environ({"QWEN_LAB_HUB_PASSWORD": PASSWORD, "QWEN_LAB_HUB_KERNEL_CACHE": str(folder),
                                       "QWEN_LAB_HUB_THREADS": "2", "QWEN_LAB_HUB_CACHE": str(tmp_path / "hf"),
                                       "QWEN_LAB_HUB_REAL_MODELS": ""}, cores=8)
    fix = (f"every learner will compile the kernels and measure their plans at once; fill it while the server is "
           f"quiet, as root: `qwen-lab tune --kernel-cache {folder} --threads 2 --cache-dir {tmp_path / 'hf'} "
           f"qwen-lab/tiny-chat`")
    assert room.kernel_cache_warning(settings) == f"the room's kernel cache {folder} does not exist: {fix}"
    built = kernels._library()._name  # the build copied in, not compiled again: the hub test's tune compiles
    monkeypatch.setattr(kernels, "_build", lambda cc, target: shutil.copyfile(built, target))
    monkeypatch.setattr(tuning, "measure", lambda *a, **k: (kernels.DEFAULT_PLAN, {str(kernels.DEFAULT_PLAN): 1e9}))
    shared_cache.prepare(folder, ["qwen-lab/tiny-chat"], 3, say=lambda line: None)  # the wrong thread count
    assert room.kernel_cache_warning(settings) == (
        f"the room's kernel cache {folder} holds no plans for {kernels.cpu_model() or 'this CPU'} with 2 threads "
        f"per learner: {fix}")
    shared_cache.prepare(folder, ["qwen-lab/tiny-chat"], 2, say=lambda line: None)
    for path in [folder, *folder.rglob("*")]:  # as `chmod -R a+rX,go-w` run by root leaves it
        path.chmod(0o555 if path.is_dir() else 0o444)
    if ROOT_USER:  # root may write anything: the mode bits decide for the unprivileged user the hub runs as
        monkeypatch.setattr(room.os, "access", lambda p, mode: bool(os.stat(p).st_mode & stat.S_IWUSR))
    try:
        assert room.kernel_cache_warning(settings) is None
        folder.chmod(0o755)
        assert room.kernel_cache_warning(settings) == (
            f"the room's kernel cache {folder} is writable by the learners (they run as this user): make it "
            f"read-only, e.g. `chmod -R a-w {folder}` as its owner")
    finally:
        for path in [folder, *folder.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)


def test_find_proxy_without_npm_s_proxy_or_node(monkeypatch, tmp_path):
    monkeypatch.setattr(room, "LOCAL_PROXY", tmp_path / "node_modules" / ".bin" / "configurable-http-proxy")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # nothing on PATH either
    with pytest.raises(room.RoomError) as e:
        room.find_proxy({})
    assert str(e.value) == ("configurable-http-proxy not found: run `make workshop-proxy` (npm ci in workshop/) "
                            "or `npm install -g configurable-http-proxy`")
    proxy = tmp_path / "bin" / "configurable-http-proxy"  # the proxy, but no Node.js to run it
    proxy.parent.mkdir()
    proxy.write_text("#!/usr/bin/env node\n")
    proxy.chmod(0o755)
    with pytest.raises(room.RoomError) as e:
        room.find_proxy({})
    assert str(e.value).startswith("node not found: configurable-http-proxy runs on Node.js 18 or later")


@pytest.mark.parametrize("version, refused", [("v16.20.2", "Node.js v16.20.2"), ("v8.10.0", "Node.js v8.10.0"),
                                              ("", "Node.js of no version it can tell"), ("v18.19.0", None),
                                              ("v22.12.0", None)])
def test_find_proxy_refuses_a_node_too_old_for_the_proxy(monkeypatch, tmp_path, version, refused):
    """An older distribution's nodejs would fail at the proxy's first start, far from the cause: one line instead."""
    lock = json.loads((WORKSHOP / "package-lock.json").read_text())
    package = lock["packages"]["node_modules/configurable-http-proxy"]
    assert package["engines"]["node"].replace(" ", "") == f">={room.MIN_NODE}"
    proxy = tmp_path / "node_modules" / ".bin" / "configurable-http-proxy"
    node = tmp_path / "bin" / "node"
    for path, text in ((proxy, "#!/usr/bin/env node\n"), (node, f"#!/bin/sh\necho '{version}'\n")):
        path.parent.mkdir(parents=True)
        path.write_text(text)
        path.chmod(0o755)
    monkeypatch.setattr(room, "LOCAL_PROXY", proxy)
    monkeypatch.setenv("PATH", str(node.parent))
    if refused is None:
        assert room.find_proxy({}) == str(proxy)
        return
    with pytest.raises(room.RoomError) as e:
        room.find_proxy({})
    assert str(e.value) == (f"{node} is {refused}: configurable-http-proxy needs Node.js 18 or later "
                            f"(https://nodejs.org/en/download, or your distribution's nodejs package where it is 18 "
                            f"or later)")


@pytest.mark.parametrize("env, message", [
    ({}, "QWEN_LAB_HUB_PASSWORD is not set: set the room's shared password, 8 characters or more, in the hub's "
         "environment"),
    ({"QWEN_LAB_HUB_PASSWORD": "short"}, "QWEN_LAB_HUB_PASSWORD has 5 characters: set the room's shared password, "
                                         "8 characters or more, in the hub's environment"),
    ({"QWEN_LAB_HUB_PASSWORD": PASSWORD, "QWEN_LAB_HUB_LEARNERS": "thirty"},
     "QWEN_LAB_HUB_LEARNERS='thirty' is not a whole number of at least 1"),
    ({"QWEN_LAB_HUB_PASSWORD": PASSWORD, "QWEN_LAB_HUB_HOMES": "/srv/learners"},
     "QWEN_LAB_HUB_HOMES='/srv/learners' must be an absolute path containing {username}, e.g. "
     "/srv/qwen-lab/learners/{username}"),
    ({"QWEN_LAB_HUB_PASSWORD": PASSWORD, "QWEN_LAB_HUB_SOLUTIONS": "yes"},
     "QWEN_LAB_HUB_SOLUTIONS='yes' must be 1 (learners get notebooks/solutions/) or 0 (they do not, the default)"),
    ({"QWEN_LAB_HUB_PASSWORD": PASSWORD, "QWEN_LAB_HUB_ADMIN_PASSWORD": "too-short-for-an-admin"},
     "QWEN_LAB_HUB_ADMIN_PASSWORD must have 32 characters or more and differ from the learners' password (or leave "
     "it unset)"),
])
def test_bad_room_settings_get_one_line(env, message):
    with pytest.raises(room.RoomError) as e:
        room.Room.from_environ(env, cores=8)
    assert str(e.value) == message


def test_a_kit_learners_could_change_is_one_line_saying_the_fix(monkeypatch, tmp_path):
    kit = tmp_path / "kit"
    for name in ("qwen_lab/generation.py", "qwen_lab/models/tiny-chat/config.json", "notebooks/01_download.ipynb",
                 "training/corpus.py", "workshop/learner_start.py", "README.md"):
        (kit / name).parent.mkdir(parents=True, exist_ok=True)
        (kit / name).write_text("")
    (kit / "notebooks" / "hub.py").symlink_to(kit / "qwen_lab" / "generation.py")  # a link is its target's business
    for path in [kit, *kit.rglob("*")]:  # as `chmod -R a+rX,go-w` run by root leaves it for the hub's user
        if not path.is_symlink():
            path.chmod(0o555 if path.is_dir() else 0o444)
    if ROOT_USER:  # root may write anything: the mode bits decide for the unprivileged user the hub runs as
        monkeypatch.setattr(room.os, "access", lambda p, mode: bool(os.stat(p).st_mode & stat.S_IWUSR))
    try:
        assert room.writable_kit_warning(kit) is None
        (kit / "qwen_lab" / "models" / "tiny-chat" / "config.json").chmod(0o644)
        assert room.writable_kit_warning(kit) == (
            f"the kit {kit} is writable by the learners, who run as this user ({kit}/qwen_lab/models/tiny-chat/"
            f"config.json, for one): a change there reaches every learner's kernel; as root: `chown -R root: {kit} "
            f"&& chmod -R a+rX,go-w {kit}`")
        kit.chmod(0o755)  # the kit's own folder: a learner could add a module beside the package
        assert room.writable_kit_warning(kit).startswith(f"the kit {kit} is writable by the learners, who run as "
                                                         f"this user: a change there")
    finally:
        for path in [kit, *kit.rglob("*")]:
            if not path.is_symlink():
                path.chmod(0o755 if path.is_dir() else 0o644)


def test_threads_are_the_cores_shared_by_the_learners():
    settings = {"QWEN_LAB_HUB_PASSWORD": PASSWORD}
    assert room.Room.from_environ({**settings, "QWEN_LAB_HUB_LEARNERS": "30"}, cores=64).threads == 2
    assert room.Room.from_environ({**settings, "QWEN_LAB_HUB_LEARNERS": "40"}, cores=16).threads == 1
    assert room.Room.from_environ({**settings, "QWEN_LAB_HUB_THREADS": "3"}, cores=16).threads == 3
    assert room.Room.from_environ(settings, cores=60).threads == 60 // room.DEFAULT_LEARNERS


def test_the_cores_shared_are_those_a_cgroup_quota_leaves_the_hub(monkeypatch):
    """In a container given 4 CPUs of a 64-core host (docker --cpus=4, systemd CPUQuota=400%), learners were given
    64 / learners threads each: 2 learners, 32 threads each on 4 CPUs' worth of time."""
    import qwen_lab.threads
    monkeypatch.setattr(qwen_lab.threads, "affinity_cpus", lambda: 64)
    monkeypatch.setattr(room.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    monkeypatch.setattr(qwen_lab.threads, "cgroup_quota", lambda: 4.0)
    settings = {"QWEN_LAB_HUB_PASSWORD": PASSWORD, "QWEN_LAB_HUB_LEARNERS": "2"}
    assert room.Room.from_environ(settings).threads == 2
    monkeypatch.setattr(qwen_lab.threads, "cgroup_quota", lambda: None)  # no quota: the affinity mask
    assert room.Room.from_environ(settings).threads == 32


def test_learner_start_copies_the_notebooks_without_overwriting_edits(tmp_path):
    dest = tmp_path / "notebooks"
    (dest / "zh-TW").mkdir(parents=True)
    (dest / "05_generate.ipynb").write_text("my edits")
    (dest / "zh-TW" / "02_load.ipynb").write_text("我的筆記")
    source = ROOT / "notebooks"
    copied = learner_start.copy_notebooks(source, dest)
    english = sorted(p.name for p in source.glob("*.ipynb"))
    chinese = sorted(f"zh-TW/{p.name}" for p in (source / "zh-TW").glob("*.ipynb"))
    assert copied == [n for n in english if n != "05_generate.ipynb"] + ["GLOSSARY.md"] + \
        [n for n in chinese if n != "zh-TW/02_load.ipynb"]
    assert (dest / "05_generate.ipynb").read_text() == "my edits"
    assert (dest / "zh-TW" / "02_load.ipynb").read_text() == "我的筆記"
    assert (dest / "GLOSSARY.md").read_bytes() == (source / "GLOSSARY.md").read_bytes()
    assert not (dest / "solutions").exists()  # the instructor's choice, off unless asked
    assert learner_start.copy_notebooks(source, dest) == []  # a restart copies nothing more
    # the instructor hands out the solutions: the next start adds them, and only them
    solutions = sorted(f"solutions/{p.name}" for p in (source / "solutions").glob("*.ipynb"))
    assert len(solutions) == len(english) and learner_start.copy_notebooks(source, dest, solutions=True) == solutions


def test_learner_start_on_a_full_disk_leaves_no_cut_off_notebook_and_starts_the_server(tmp_path):
    """A copy cut short stayed as the learner's notebook (never overwritten) after a traceback: once the disk had
    room again, every start kept the empty 01_download.ipynb. Now: no part left, one line, the server starts."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER", "QWEN_LAB_"))}
    env.update(HOME=str(home), QWEN_LAB_NOTEBOOKS=str(ROOT / "notebooks"))
    code = ("import os, sys; sys.path.insert(0, sys.argv[1]); import learner_start; "
            "os.execv = lambda path, args: print('server started', args[-1]); learner_start.main(['--hub-args'])")
    with files_cut_at(4096):  # the notebooks are larger: the first copy stops part-way
        done = subprocess.run([sys.executable, "-c", code, str(WORKSHOP)], env=env, capture_output=True, text=True,
                              timeout=120)
    assert done.returncode == 0 and done.stdout == "server started --hub-args\n", done.stderr
    assert done.stderr.splitlines()[0] == (
        f"learner_start: error: cannot copy the notebooks into {home / 'notebooks'}: File too large; fix that (free "
        f"space on that disk), then restart this learner's server: what is missing is copied then")
    assert sorted(p.name for p in (home / "notebooks").iterdir()) == []  # nothing cut off, nothing half-written
    assert learner_start.copy_notebooks(ROOT / "notebooks", home / "notebooks")[0] == "01_download.ipynb"
    assert (home / "notebooks" / "01_download.ipynb").read_bytes() == (ROOT / "notebooks" / "01_download.ipynb"
                                                                        ).read_bytes()


def test_learner_start_has_closed_tabs_shut_their_kernels_down_unless_the_learner_chose(tmp_path):
    """Each notebook opened starts a kernel, and JupyterLab keeps it when its tab closes: seven per learner by 07."""
    name, values = learner_start.KERNEL_SHUTDOWN_SETTING
    schema = Path(sys.prefix) / "share" / "jupyter" / "lab" / "schemas" / name.with_suffix(".json")
    assert json.loads(schema.read_text())["properties"]["kernelShutdown"]["default"] is False  # JupyterLab's own
    assert learner_start.shut_kernels_down_on_close(tmp_path) is True
    assert json.loads((tmp_path / name).read_text()) == values == {"kernelShutdown": True}
    (tmp_path / name).write_text('{"kernelShutdown": false, "recordTiming": true}')  # the learner's own choice
    assert learner_start.shut_kernels_down_on_close(tmp_path) is False
    assert (tmp_path / name).read_text() == '{"kernelShutdown": false, "recordTiming": true}'


def test_learner_start_starts_the_server_with_kernel_culling_and_the_hub_s_arguments(monkeypatch, tmp_path):
    from jupyter_server.services.kernels.kernelmanager import MappingKernelManager
    for argument in learner_start.KERNEL_CULLING:  # each a configurable trait of the installed jupyter_server
        cls, trait = argument.removeprefix("--").split("=")[0].split(".")
        assert cls == "MappingKernelManager" and MappingKernelManager.class_traits(config=True).get(trait), argument
    home = tmp_path / "home"
    home.mkdir()
    for name in list(os.environ):
        if name.startswith(("JUPYTER", "QWEN_LAB_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("QWEN_LAB_NOTEBOOKS", str(ROOT / "notebooks"))
    calls = []
    monkeypatch.setattr(learner_start.os, "execv", lambda path, args: calls.append((path, args)))
    learner_start.main(["--ServerApp.allow_root=True"])
    assert calls == [(sys.executable, [sys.executable, "-m", "jupyterhub.singleuser",
                                       f"--MappingKernelManager.cull_idle_timeout={learner_start.CULL_IDLE_SECONDS}",
                                       "--MappingKernelManager.cull_interval=300",
                                       "--MappingKernelManager.cull_connected=False",
                                       "--ServerApp.allow_root=True"])]
    setting, values = learner_start.KERNEL_SHUTDOWN_SETTING
    assert json.loads((home / ".jupyter" / "lab" / "user-settings" / setting).read_text()) == values
    assert (home / "notebooks" / "01_download.ipynb").is_file() and (home / "qwen_lab").is_symlink()


def test_solutions_asked_for_but_not_there_is_one_line(tmp_path):
    (tmp_path / "01_download.ipynb").write_text("{}")
    settings = room.Room.from_environ({"QWEN_LAB_HUB_PASSWORD": PASSWORD, "QWEN_LAB_HUB_SOLUTIONS": "1",
                                       "QWEN_LAB_NOTEBOOKS": str(tmp_path), "QWEN_LAB_HUB_ALLOW_ROOT": "1"}, cores=8)
    assert settings.solutions and room.learner_environment(settings)["QWEN_LAB_SOLUTIONS"] == "1"
    with pytest.raises(room.RoomError) as e:
        room.check(settings)
    assert str(e.value) == (f"QWEN_LAB_HUB_SOLUTIONS=1 but {tmp_path}/solutions holds no notebooks: set "
                            f"QWEN_LAB_NOTEBOOKS to the kit's notebooks/ folder, or QWEN_LAB_HUB_SOLUTIONS=0")


# ---------------------------------------------------------------- Kubernetes, on paper, kept in step

def config_as_jupyterhub_loads_it(monkeypatch, state: Path):
    """What jupyterhub_config.py sets, loaded as JupyterHub loads it, with z2jh's cache path and model."""
    from traitlets.config import loader  # JupyterHub's own config loader (traitlets comes with Jupyter)
    checked = load_room()
    monkeypatch.setattr(checked, "check", lambda settings: None)  # no cache or proxy needed to read the settings
    monkeypatch.setattr(checked, "find_proxy", lambda environ: "configurable-http-proxy")
    monkeypatch.setitem(sys.modules, "room", checked)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the config adds workshop/ to it
    for name in list(os.environ):
        if name.startswith(("QWEN_LAB_", "HF_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("QWEN_LAB_HUB_PASSWORD", PASSWORD)
    monkeypatch.setenv("QWEN_LAB_HUB_THREADS", "2")
    monkeypatch.setenv("QWEN_LAB_HUB_STATE", str(state))
    return loader.PyFileConfigLoader(CONFIG.name, str(CONFIG.parent)).load_config()


def test_the_port_book_never_gives_a_port_it_gave_while_that_server_may_still_be_starting():
    now = [0.0]
    offered = iter([9001, 9001, 9002, 9001, 9002, 9003, 9001])  # the system offering a port twice, as it did
    book = room.PortBook(hold=240, candidate=offered.__next__, clock=lambda: now[0])
    assert [book.take(), book.take(), book.take()] == [9001, 9002, 9003]
    now[0] = 300  # past the hold: 9001's server has bound it, or never will; the system decides again
    assert book.take() == 9001
    stuck = room.PortBook(candidate=lambda: 9001)
    stuck.take()
    with pytest.raises(room.RoomError, match="no free port"):
        stuck.take()


def test_the_hub_gives_learners_starting_together_each_their_own_free_port(monkeypatch, tmp_path):
    """JupyterHub's own pick gave two of four learners starting at once port 34223 on this machine:
    the second server failed, and the hub routed its learner to the first learner's server."""
    from types import SimpleNamespace
    c = config_as_jupyterhub_loads_it(monkeypatch, tmp_path)
    spawners = [SimpleNamespace(port=0) for _ in range(30)]
    for spawner in spawners:
        c.Spawner.pre_spawn_hook(spawner)
    ports = [s.port for s in spawners]
    assert len(set(ports)) == 30 and all(p > 0 for p in ports)
    for port in ports:  # and free: a server can bind each
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_kubernetes_config_agrees_with_the_tested_one(monkeypatch, tmp_path):
    import yaml  # PyYAML comes with JupyterLab (jupyter-events)
    z2jh = yaml.safe_load((WORKSHOP / "z2jh" / "config.yaml").read_text())
    dockerfile = (WORKSHOP / "z2jh" / "Dockerfile").read_text()
    c = config_as_jupyterhub_loads_it(monkeypatch, tmp_path)
    single = z2jh["singleuser"]
    # the login
    hub = z2jh["hub"]["config"]
    assert hub["JupyterHub"]["authenticator_class"] == c.JupyterHub.authenticator_class == "shared-password"
    assert hub["Authenticator"]["allow_all"] is c.Authenticator.allow_all is True
    assert hub["Authenticator"]["username_pattern"] == c.Authenticator.username_pattern
    assert hub["SharedPasswordAuthenticator"]["user_password"] is None  # never a password in the repository
    # the learners' environment: the same names and values (PATH is the image's own)
    env = dict(c.Spawner.environment)
    env.pop("PATH")
    mount = next(m for m in single["storage"]["extraVolumeMounts"] if m["name"] == "hf-cache")
    notebooks = re.search(r"^COPY notebooks (\S+)$", dockerfile, re.M).group(1)  # all of it: zh-TW/, solutions/...
    source = re.search(r"^COPY qwen_lab (\S+)/qwen_lab$", dockerfile, re.M).group(1)  # the kit, as the image holds it
    assert re.search(rf"^COPY training {re.escape(source)}/training$", dockerfile, re.M)
    assert re.search(rf"^ENV QWEN_LAB_SOURCE={re.escape(source)}$", dockerfile, re.M)
    assert env["QWEN_LAB_SOURCE"] == str(ROOT)  # on one server: this kit
    expected = {**env, "HF_HUB_CACHE": mount["mountPath"], "QWEN_LAB_NOTEBOOKS": notebooks, "QWEN_LAB_SOURCE": source,
                "QWEN_LAB_THREADS": str(single["cpu"]["limit"]), "OMP_NUM_THREADS": str(single["cpu"]["limit"])}
    assert single["extraEnv"] == expected
    assert env["QWEN_LAB_MODEL"] == single["extraEnv"]["QWEN_LAB_MODEL"] == room.DEFAULT_MODEL
    # the real models learners switch to: what the fill-cache Job downloads, what the docs say
    [job] = [d for d in yaml.safe_load_all((WORKSHOP / "z2jh" / "fill-cache.yaml").read_text()) if d["kind"] == "Job"]
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:4] == ["qwen-lab", "download", "--cache-dir", mount["mountPath"]]
    assert tuple(command[4:]) == room.DEFAULT_REAL_MODELS
    guide = (ROOT / "docs" / "workshop.md").read_text()
    for name in sorted(set(re.findall(r"\bQWEN_LAB_HUB_[A-Z_]+", (WORKSHOP / "room.py").read_text()))):
        assert f"``{name}``" in room.__doc__, f"{name} is missing from room.py's table of settings"
    assert f"default ``{room.DEFAULT_MODEL}``" in room.__doc__
    assert f"default ``{','.join(room.DEFAULT_REAL_MODELS)}``" in room.__doc__
    assert f"QWEN_LAB_HUB_REAL_MODELS={','.join(room.DEFAULT_REAL_MODELS)}" in guide
    assert f"qwen-lab tune --kernel-cache {room.DEFAULT_KERNEL_CACHE} --threads 2 \\\n    --cache-dir " \
           f"{room.DEFAULT_CACHE} {room.DEFAULT_MODEL} {' '.join(room.DEFAULT_REAL_MODELS)}" in guide
    assert env["HF_HUB_CACHE"] == mount["mountPath"] == room.DEFAULT_CACHE
    assert env["HF_HUB_OFFLINE"] == single["extraEnv"]["HF_HUB_OFFLINE"] == "1"
    assert re.search(rf"^ENV QWEN_LAB_NOTEBOOKS={re.escape(notebooks)}$", dockerfile, re.M)
    # the cache is mounted read-only, from a claim mounted read-only
    volume = next(v for v in single["storage"]["extraVolumes"] if v["name"] == "hf-cache")
    assert mount["readOnly"] is True and volume["persistentVolumeClaim"]["readOnly"] is True
    # and so is the room's kernel cache, filled by tune.yaml's Job for the room's models, with a pod's threads
    kernel_mount = next(m for m in single["storage"]["extraVolumeMounts"] if m["name"] == "kernel-cache")
    kernel_volume = next(v for v in single["storage"]["extraVolumes"] if v["name"] == "kernel-cache")
    assert kernel_mount["mountPath"] == env["QWEN_LAB_SHARED_CACHE"] == room.DEFAULT_KERNEL_CACHE
    assert kernel_mount["readOnly"] is True and kernel_volume["persistentVolumeClaim"]["readOnly"] is True
    [claim, tune] = yaml.safe_load_all((WORKSHOP / "z2jh" / "tune.yaml").read_text())
    assert claim["metadata"]["name"] == kernel_volume["persistentVolumeClaim"]["claimName"]
    [container] = tune["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["qwen-lab", "tune", "--kernel-cache", kernel_mount["mountPath"], "--threads",
                                    str(single["cpu"]["limit"]), "--cache-dir", mount["mountPath"], room.DEFAULT_MODEL,
                                    *room.DEFAULT_REAL_MODELS]
    assert container["resources"]["limits"]["cpu"] == single["cpu"]["limit"]  # measured as a pod will run
    mounts = {m["mountPath"]: m.get("readOnly", False) for m in container["volumeMounts"]}
    assert mounts == {mount["mountPath"]: True, kernel_mount["mountPath"]: False}
    # the notebooks are copied by the same script, the start page is the same
    script = single["cmd"][-1]
    assert Path(script).name == Path(c.Spawner.cmd[-1]).name == "learner_start.py"
    assert re.search(rf"^COPY workshop/learner_start.py {re.escape(script)}$", dockerfile, re.M)
    assert re.search(rf'^CMD \["python", "{re.escape(script)}"\]$', dockerfile, re.M)
    assert single["defaultUrl"] == c.Spawner.default_url
    # and the image's torch is the CPU-only build
    assert "--index-url https://download.pytorch.org/whl/cpu" in dockerfile


def test_learner_start_links_what_the_notebooks_link_to_so_their_links_open(tmp_path):
    """The notebooks link to ../README.md, ../qwen_lab/hub.py...: in a learner's home those were 404s."""
    home = tmp_path / "home"
    (home / "training").mkdir(parents=True)  # the learner's own folder of that name stays theirs
    learner_start.copy_notebooks(ROOT / "notebooks", home / "notebooks", solutions=True)
    assert learner_start.link_sources(ROOT, home) == ["README.md", "qwen_lab"]
    assert learner_start.link_sources(ROOT, home) == []  # a restart links nothing more
    assert (home / "README.md").is_symlink() and not (home / "training").is_symlink()
    (home / "training").rmdir()
    assert learner_start.link_sources(ROOT, home) == ["training"]
    for notebook in sorted((home / "notebooks").rglob("*.ipynb")):
        for cell in json.loads(notebook.read_text(encoding="utf-8"))["cells"]:
            markdown = "".join(cell["source"]) if cell["cell_type"] == "markdown" else ""
            for link in re.findall(r"\]\(([^)\s#]+)", markdown):
                if re.match(r"[a-z]+:", link):
                    continue
                inside = os.path.normpath(notebook.parent / link)  # as the server sees it: links not followed
                assert inside.startswith(str(home) + os.sep) and os.path.exists(inside), \
                    f"{notebook.relative_to(home)}: {link} does not open in the learner's home"


def dockerignore_matcher(text: str):
    """Docker's ignore rules as a function of a context path: True if the build context leaves it out.

    As BuildKit reads them: one pattern a line, ``#`` comments, a leading ``/`` dropped, ``*`` and ``?``
    within one path element, ``**`` any number of elements, ``!`` an exception (the last matching line
    decides), and a path left out when it or any folder above it matches.
    """
    rules = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keep = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip().lstrip("/"))
        regex = ""
        for part in re.split(r"(\*\*/|/\*\*$|\*\*|\*|\?)", pattern):
            regex += {"**/": "(?:.*/)?", "/**": "(?:/.*)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(
                part, re.escape(part))
        rules.append((re.compile(regex + r"\Z"), keep))

    def ignored(path: str) -> bool:
        parts = path.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        verdict = False
        for regex, keep in rules:
            if any(regex.match(p) for p in prefixes):
                verdict = not keep
        return verdict

    return ignored


def test_the_image_s_build_context_holds_every_file_its_copy_lines_name():
    """BuildKit reads z2jh/Dockerfile.dockerignore: a COPY of an ignored folder fails the build ("not found")."""
    dockerfile = (WORKSHOP / "z2jh" / "Dockerfile").read_text()
    ignored = dockerignore_matcher((WORKSHOP / "z2jh" / "Dockerfile.dockerignore").read_text())
    sources = [source for line in re.findall(r"^COPY (.+)$", dockerfile, re.M)
               for source in [w for w in line.split() if not w.startswith("--")][:-1]]
    assert {"qwen_lab", "training", "notebooks", "workshop/learner_start.py"} <= set(sources)
    tracked = subprocess.run(["git", "ls-files", *sources], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    for source in sources:  # each names files the repository has, and none of them is left out
        files = [f for f in tracked if f == source or f.startswith(source + "/")]
        assert files, f"COPY {source}: no such file in the repository"
        assert not [f for f in files if ignored(f)], f"COPY {source}: the build context leaves out {source}"
    # what must stay out: local environments, npm's packages, the offline room's multi-GB cache and wheels
    for path in (".venv/bin/python", "workshop/node_modules/.bin/configurable-http-proxy", "room/hf-cache/x",
                 "room/wheelhouse/torch.whl", "wheelhouse/x.whl", "qwen_lab/__pycache__/hub.cpython-311.pyc",
                 "notebooks/.ipynb_checkpoints/01_download-checkpoint.ipynb"):
        assert ignored(path), f"{path} would be sent to the builder"


def fake_wheel(folder: Path, name: str, requires: list[str] = (), extras: list[str] = ()) -> None:
    """A wheel with nothing in it but the metadata pip's resolver reads."""
    import zipfile
    dist = f"{name.replace('-', '_')}-0.0.1"
    metadata = "".join([f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.0.1\n",
                        *(f"Provides-Extra: {e}\n" for e in extras), *(f"Requires-Dist: {r}\n" for r in requires)])
    with zipfile.ZipFile(folder / f"{dist}-py3-none-any.whl", "w") as wheel:
        wheel.writestr(f"{dist}.dist-info/METADATA", metadata)
        wheel.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                   "Tag: py3-none-any\n")
        wheel.writestr(f"{dist}.dist-info/RECORD", "")


def test_make_wheelhouse_checks_the_extras_it_was_asked_for(tmp_path):
    """`WHEELHOUSE_EXTRAS=notebooks,workshop` is for a hub server: a wheelhouse without JupyterHub must not pass."""
    need(subprocess.run(["make", "--version"], capture_output=True).returncode == 0, "make is not installed")
    fake_wheel(tmp_path, "qwen-lab", ["notebook-dep; extra == 'notebooks'", "hub-dep; extra == 'workshop'"],
               ["notebooks", "workshop"])
    fake_wheel(tmp_path, "notebook-dep")  # and no hub-dep

    def check(extras: str) -> subprocess.CompletedProcess:
        """The recipe's last command (its check), as make would run it, on this folder."""
        # not as a sub-make of `make test`: its MAKEFLAGS would add "make[1]: Entering directory" lines
        env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
        recipe = subprocess.run(["make", "-n", "--no-print-directory", "wheelhouse", f"VENV={sys.prefix}",
                                 f"WHEELHOUSE={tmp_path}", f"WHEELHOUSE_EXTRAS={extras}"], cwd=ROOT, env=env,
                                capture_output=True, text=True, check=True)
        last = recipe.stdout.replace("\\\n", " ").strip().splitlines()[-1]
        return subprocess.run(["sh", "-c", last], cwd=ROOT, capture_output=True, text=True, timeout=300)

    done = check("notebooks")
    assert done.returncode == 0 and "pip installs qwen-lab[notebooks] from them alone" in done.stdout, done
    done = check("notebooks,workshop")
    assert done.returncode == 1, done
    assert f"{tmp_path} lacks a wheel for hub-dep (needed by qwen-lab[notebooks,workshop]" in done.stdout


def test_the_dockerignore_matcher_follows_docker_s_rules():
    ignored = dockerignore_matcher("# a comment\n/build\n**/*.pyc\ndocs/*.md\n!docs/keep.md\nx?z\n")
    assert ignored("build") and ignored("build/lib/a.py") and not ignored("src/build")
    assert ignored("a.pyc") and ignored("a/b/c.pyc") and not ignored("a.py")
    assert ignored("docs/a.md") and not ignored("docs/keep.md") and not ignored("docs/sub/a.md")
    assert ignored("xyz") and not ignored("xyyz") and not ignored("# a comment")
