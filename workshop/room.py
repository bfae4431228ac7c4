"""The room's settings, for ``jupyterhub_config.py``: what every learner gets, checked before the hub starts.

Everything is an environment variable of the ``jupyterhub`` process, so the config file itself is
never edited (a systemd unit's ``Environment=`` lines, or ``export`` before ``make hub``):

====================================  =====================================================================
``QWEN_LAB_HUB_PASSWORD``             the room's shared password, 8 characters or more (required)
``QWEN_LAB_HUB_ADMIN_PASSWORD``       optional, 32 characters or more: log in as ``instructor`` with it to
                                      see and stop every learner's server (``/hub/admin``)
``QWEN_LAB_MODEL``                    the model the notebooks use (default ``qwen-lab/tiny-chat``, the embedded
                                      model: notebooks 01-06 give every learner the committed outputs)
``QWEN_LAB_HUB_REAL_MODELS``          the real model(s) learners switch to for notebook 07 (``%env
                                      QWEN_LAB_MODEL=...``, then restart the kernel), comma-separated Hub ids, each
                                      of which must be in the cache (default ``Qwen/Qwen2.5-1.5B-Instruct``; empty:
                                      none)
``QWEN_LAB_HUB_CACHE``                the shared Hugging Face cache, filled once with ``qwen-lab download
                                      --cache-dir``; learners only read it (default ``/srv/qwen-lab/hf-cache``)
``QWEN_LAB_HUB_KERNEL_CACHE``         the decode kernels compiled and their plans measured once for the room, with
                                      ``qwen-lab tune``; learners only read it (``QWEN_LAB_SHARED_CACHE``), and
                                      build or measure what it lacks in their own ``~/.cache/qwen_lab`` (default
                                      ``/srv/qwen-lab/kernel-cache``)
``QWEN_LAB_HUB_LEARNERS``             how many learners work at once (default 30): each gets
                                      cores / learners threads, at least one (the cores: the CPUs the
                                      hub may use, its cgroup's CPU quota counted)
``QWEN_LAB_HUB_THREADS``              or the threads per learner, directly
``QWEN_LAB_HUB_HOMES``                each learner's folder, ``{username}`` replaced
                                      (default ``/srv/qwen-lab/learners/{username}``)
``QWEN_LAB_HUB_STATE``                the hub's own files: database, cookie secret (default ``/srv/qwen-lab/hub``)
``QWEN_LAB_HUB_PROXY``                ``configurable-http-proxy`` (default: ``workshop/node_modules``, then PATH)
``QWEN_LAB_NOTEBOOKS``                the notebooks each learner gets a copy of (default: this checkout's): the
                                      English ones, ``GLOSSARY.md`` and the Traditional Chinese ``zh-TW/``
``QWEN_LAB_HUB_SOLUTIONS``            ``1`` also gives every learner the worked solutions (``solutions/``), at
                                      their server's next start; ``0``, the default, does not
``QWEN_LAB_HUB_ALLOW_ROOT``           ``1`` lets the hub run as root (learners then run as root too: only in a
                                      throwaway container or a test, never on a machine that matters)
====================================  =====================================================================

Every check raises ``RoomError`` with one line saying what is wrong and what to do; the config file
prints it and stops, before JupyterHub starts anything.
"""
from __future__ import annotations

import errno
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

DEFAULT_MODEL = "qwen-lab/tiny-chat"  # the teaching plan's model for 01-06 (docs/workshop.md, "Which model, when")
DEFAULT_REAL_MODELS = ("Qwen/Qwen2.5-1.5B-Instruct",)  # and the real one for 07
DEFAULT_CACHE = "/srv/qwen-lab/hf-cache"
DEFAULT_KERNEL_CACHE = "/srv/qwen-lab/kernel-cache"
DEFAULT_HOMES = "/srv/qwen-lab/learners/{username}"
DEFAULT_STATE = "/srv/qwen-lab/hub"
DEFAULT_LEARNERS = 30
LOCAL_PROXY = HERE / "node_modules" / ".bin" / "configurable-http-proxy"
#: The oldest Node.js that configurable-http-proxy 5 runs on (the "engines" of workshop/package-lock.json).
MIN_NODE = 18
NODE_ADVICE = (f"https://nodejs.org/en/download, or your distribution's nodejs package where it is {MIN_NODE} or "
               f"later")
MIN_PASSWORD = 8         # SharedPasswordAuthenticator's own minimums
MIN_ADMIN_PASSWORD = 32
ADMIN_USER = "instructor"
#: Learners' names become folder names: lower-case letters, digits, '-' and '_', 1 to 32 of them.
USERNAME_PATTERN = r"[a-z0-9][a-z0-9_-]{0,31}"


class RoomError(Exception):
    """A setting of the room is missing or wrong; the message says which, and what to do."""


@dataclass
class Room:
    password: str
    admin_password: str | None
    model: str
    real_models: tuple[str, ...]
    cache: Path
    kernel_cache: Path
    threads: int
    homes: str
    state: Path
    notebooks: Path
    allow_root: bool
    solutions: bool

    @property
    def proxy_pid_file(self) -> Path:
        """Where JupyterHub keeps its proxy's pid: a hub started again finds a proxy left running there."""
        return self.state / "jupyterhub-proxy.pid"

    @classmethod
    def from_environ(cls, environ=os.environ, cores: int | None = None) -> "Room":
        """The settings from ``environ``; ``cores`` defaults to the CPUs this process may use."""
        password = environ.get("QWEN_LAB_HUB_PASSWORD", "")
        if len(password) < MIN_PASSWORD:
            problem = "is not set" if not password else f"has {len(password)} characters"
            raise RoomError(f"QWEN_LAB_HUB_PASSWORD {problem}: set the room's shared password, "
                            f"{MIN_PASSWORD} characters or more, in the hub's environment")
        admin = environ.get("QWEN_LAB_HUB_ADMIN_PASSWORD") or None
        if admin is not None and (len(admin) < MIN_ADMIN_PASSWORD or admin == password):
            raise RoomError(f"QWEN_LAB_HUB_ADMIN_PASSWORD must have {MIN_ADMIN_PASSWORD} characters or more and "
                            f"differ from the learners' password (or leave it unset)")
        homes = environ.get("QWEN_LAB_HUB_HOMES") or DEFAULT_HOMES
        if "{username}" not in homes or not Path(homes).is_absolute():
            raise RoomError(f"QWEN_LAB_HUB_HOMES={homes!r} must be an absolute path containing {{username}}, "
                            f"e.g. {DEFAULT_HOMES}")
        return cls(password=password, admin_password=admin,
                   model=environ.get("QWEN_LAB_MODEL") or DEFAULT_MODEL, real_models=_real_models(environ),
                   cache=Path(environ.get("QWEN_LAB_HUB_CACHE") or DEFAULT_CACHE),
                   kernel_cache=Path(environ.get("QWEN_LAB_HUB_KERNEL_CACHE") or DEFAULT_KERNEL_CACHE),
                   threads=_threads(environ, cores), homes=homes,
                   state=Path(environ.get("QWEN_LAB_HUB_STATE") or DEFAULT_STATE),
                   notebooks=Path(environ.get("QWEN_LAB_NOTEBOOKS") or REPO / "notebooks"),
                   allow_root=environ.get("QWEN_LAB_HUB_ALLOW_ROOT") == "1", solutions=_solutions(environ))


def _real_models(environ) -> tuple[str, ...]:
    """QWEN_LAB_HUB_REAL_MODELS: unset, the default; set, its comma-separated names (none if it is empty)."""
    value = environ.get("QWEN_LAB_HUB_REAL_MODELS")
    if value is None:
        return DEFAULT_REAL_MODELS
    return tuple(name.strip() for name in value.split(",") if name.strip())


def _solutions(environ) -> bool:
    """Whether learners get the solutions: a typo must not hand them out, nor silently keep them back."""
    value = environ.get("QWEN_LAB_HUB_SOLUTIONS", "").strip()
    if value not in ("", "0", "1"):
        raise RoomError(f"QWEN_LAB_HUB_SOLUTIONS={value!r} must be 1 (learners get notebooks/solutions/) or 0 "
                        f"(they do not, the default)"[:300])
    return value == "1"


def threads_per_learner(cores: int, learners: int) -> int:
    """Each learner's share of the cores, at least one thread.

    Decoding reads every weight once per token, so learners generating at the same time share
    the memory bandwidth whatever their thread counts; more threads than a learner's share of
    the cores only makes threads wait for one another (``qwen_lab/threads.py``).

    >>> threads_per_learner(64, 30), threads_per_learner(2, 4), threads_per_learner(16, 4)
    (2, 1, 4)
    """
    return max(1, cores // max(1, learners))


def _whole_number(environ, name: str, default: int | None) -> int | None:
    value = environ.get(name, "").strip()
    if not value:
        return default
    if not value.isdigit() or int(value) < 1:
        raise RoomError(f"{name}={value!r} is not a whole number of at least 1")
    return int(value)


def _threads(environ, cores: int | None) -> int:
    direct = _whole_number(environ, "QWEN_LAB_HUB_THREADS", None)
    if direct is not None:
        return direct
    learners = _whole_number(environ, "QWEN_LAB_HUB_LEARNERS", DEFAULT_LEARNERS)
    if cores is None:
        cores = usable_cores()
    return threads_per_learner(cores, learners)


def usable_cores() -> int:
    """The CPUs the hub and its learners may use: the affinity mask, or fewer where a cgroup quota (a container's
    ``--cpus``, a systemd unit's ``CPUQuota=``) grants less, as a learner's kernel counts them (``qwen_lab.threads``).
    """
    from qwen_lab.threads import affinity_cpus, cgroup_quota
    cpus, quota = affinity_cpus(), cgroup_quota()
    return max(1, min(cpus, math.floor(quota))) if quota is not None else cpus


class PortBook:
    """Ports for learners' servers: never one that another learner's server was just given.

    JupyterHub's local spawner picks a port by binding port 0 and closing the socket at once, and
    the server binds it seconds later. Two learners starting together can be given the same port:
    seen on this project's 2-core test machine, 4 learners logging in at once, 2 given port 34223.
    The second server then fails to start ("port 34223 is not available"), and JupyterHub, finding
    a server answering there (the first learner's, with a 404), routes the second learner to it: a
    broken session (the first learner's server refuses them, so nothing is shared, but their
    notebook never opens). The book remembers each port it gave for ``hold`` seconds (longer than a
    server takes to start and bind it), and gives only ports the system reports free and not held.

    >>> book = PortBook(candidate=iter([9001, 9001, 9002]).__next__)
    >>> book.take(), book.take()
    (9001, 9002)
    """

    def __init__(self, hold: float = 600.0, candidate=None, clock=time.monotonic) -> None:
        self.hold, self._candidate, self._clock = hold, candidate or _unused_port, clock
        self._given: dict[int, float] = {}  # port -> when it was given
        self._lock = threading.Lock()

    def take(self) -> int:
        with self._lock:
            now = self._clock()
            self._given = {p: t for p, t in self._given.items() if now - t < self.hold}
            for _ in range(1000):
                port = self._candidate()
                if port not in self._given:
                    self._given[port] = now
                    return port
        raise RoomError("no free port for a learner's server: the system kept offering ports given out already")


def _unused_port() -> int:
    """A port nothing listens on now (the system's choice for port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def learner_environment(room: Room, python: str = sys.executable) -> dict[str, str]:
    """The environment every learner's server and kernels get (``Spawner.environment``).

    The same names and values appear in ``z2jh/config.yaml`` (``singleuser.extraEnv``);
    ``tests/test_workshop_hub.py`` checks that they agree.
    """
    return {
        "QWEN_LAB_MODEL": room.model,            # the notebooks' first cell reads it (hub.choose_model)
        "HF_HUB_OFFLINE": "1",                   # nobody waits for the Hub: everything is in the cache
        "HF_HUB_CACHE": str(room.cache),         # the one shared, read-only copy of the weights
        "QWEN_LAB_THREADS": str(room.threads),   # qwen_lab's thread count (threads.choose_threads)
        # the room's compiled kernels and measured plans, read before the learner's own ~/.cache/qwen_lab
        "QWEN_LAB_SHARED_CACHE": str(room.kernel_cache),
        "OMP_NUM_THREADS": str(room.threads),    # and torch's own pool, from the start
        "QWEN_LAB_NOTEBOOKS": str(room.notebooks),  # learner_start.py copies these into ~/notebooks
        "QWEN_LAB_SOURCE": str(REPO),            # and links this kit's README.md, qwen_lab/, training/ beside them
        "QWEN_LAB_SOLUTIONS": "1" if room.solutions else "0",  # and their solutions/ too, if "1"
        # the kit's commands (qwen-lab doctor...) in the learners' terminals
        "PATH": os.pathsep.join([str(Path(python).parent), os.environ.get("PATH", os.defpath)]),
    }


def find_proxy(environ=os.environ) -> str:
    """The ``configurable-http-proxy`` command JupyterHub will start, or a RoomError saying how to get it."""
    chosen = environ.get("QWEN_LAB_HUB_PROXY")
    candidates = [Path(chosen)] if chosen else [LOCAL_PROXY]
    found = next((str(p) for p in candidates if p.is_file() and os.access(p, os.X_OK)), None)
    if found is None and not chosen:
        found = shutil.which("configurable-http-proxy")
    if found is None:
        where = f"QWEN_LAB_HUB_PROXY={chosen} is not an executable file" if chosen else "configurable-http-proxy not found"
        raise RoomError(f"{where}: run `make workshop-proxy` (npm ci in workshop/) or "
                        f"`npm install -g configurable-http-proxy`")
    node = shutil.which("node")
    if node is None:
        raise RoomError(f"node not found: configurable-http-proxy runs on Node.js {MIN_NODE} or later ({NODE_ADVICE})")
    try:
        version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        version = ""
    major = re.match(r"v(\d+)\.", version)
    if major is None or int(major.group(1)) < MIN_NODE:
        raise RoomError(f"{node} is Node.js {version[:40] or 'of no version it can tell'}: configurable-http-proxy "
                        f"needs Node.js {MIN_NODE} or later ({NODE_ADVICE})")
    return found


def check(room: Room) -> None:
    """Refuse to start a hub whose learners would fail at their first cell."""
    if hasattr(os, "geteuid") and os.geteuid() == 0 and not room.allow_root:
        raise RoomError("the hub runs as root, and every learner's server would run as root too: run it as an "
                        "unprivileged user (see docs/workshop.md), or set QWEN_LAB_HUB_ALLOW_ROOT=1 in a "
                        "throwaway container")
    if not any(room.notebooks.glob("*.ipynb")):
        raise RoomError(f"no notebooks in {room.notebooks}: set QWEN_LAB_NOTEBOOKS to the kit's notebooks/ folder")
    if room.solutions and not any(room.notebooks.glob("solutions/*.ipynb")):
        raise RoomError(f"QWEN_LAB_HUB_SOLUTIONS=1 but {room.notebooks / 'solutions'} holds no notebooks: set "
                        f"QWEN_LAB_NOTEBOOKS to the kit's notebooks/ folder, or QWEN_LAB_HUB_SOLUTIONS=0")
    from qwen_lab.shared_cache import cannot_write
    homes_root = Path(room.homes.split("{username}")[0])  # the part of the template before the name
    for what, folder in (("QWEN_LAB_HUB_STATE", room.state), ("QWEN_LAB_HUB_HOMES", homes_root)):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RoomError(f"cannot create {folder} ({what}): {e.strerror}; create it, writable by the user "
                            f"the hub runs as") from None
        # there but not writable (another owner, a read-only mount) or its disk full: without this, the hub
        # stops in a traceback writing its cookie secret, or starts and fails every learner's server in two
        reason = cannot_write(folder)
        if reason is not None:
            raise RoomError(f"cannot write into {folder} ({what}): {reason}; it must be writable by the user the "
                            f"hub runs as ({_user()}), on a disk with space left")
    from qwen_lab.doctor import check_model  # the kit's own check: the files are there, and whole
    wanted = [("QWEN_LAB_MODEL", room.model), *(("QWEN_LAB_HUB_REAL_MODELS", m) for m in room.real_models)]
    for setting, model in wanted:  # the notebooks' model, and each the learners switch to for 07
        result = check_model(model, room.cache, required=True)
        if result.status == "FAIL":
            raise RoomError(f"{setting}: {result.detail}")


def _user() -> str:
    try:
        import pwd
        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):
        return "this user"


#: The proxy's API where nothing sets ConfigurableHTTPProxy.api_url (JupyterHub 5's default).
DEFAULT_PROXY_API = "http://127.0.0.1:8001"


@dataclass
class Address:
    url: str
    what: str        # what listens there, in words
    move: str        # the option that moves it
    proxy: bool      # whether the proxy listens there (or the hub itself)


def listening(app) -> list[Address]:
    """Each address the hub and its proxy will listen on, from the JupyterHub ``app`` being configured (its
    command line already applied: ``--port 8002`` is in ``app.bind_url``)."""
    hub_api = app.hub_bind_url or f"http://{app.hub_ip}:{app.hub_port}"
    proxy_api = (app.config.get("ConfigurableHTTPProxy") or {}).get("api_url") or DEFAULT_PROXY_API
    return [Address(app.bind_url, "the learners' address", "`--port 8002`", proxy=True),
            Address(hub_api, "the hub's API", "`--JupyterHub.hub_bind_url=http://127.0.0.1:8091`", proxy=False),
            Address(proxy_api, "the proxy's API", "`--ConfigurableHTTPProxy.api_url=http://127.0.0.1:8011`",
                    proxy=True)]


def check_ports(addresses: list[Address], proxy_pid_file: Path | None = None) -> None:
    """Refuse, in one line, a port the hub or its proxy could not listen on.

    Without this, JupyterHub reports a taken port three ways, none of them clear: the learners' port taken, the
    proxy logs EADDRINUSE, the hub logs that it is running, and learners reach the other program; the hub's API
    port, a traceback ending in "Address already in use"; the proxy's API port, a traceback ending in
    "HTTP 404" (the other program's answer). The ports of a proxy an earlier hub left running (its pid in
    ``proxy_pid_file``) are not checked: JupyterHub stops that proxy before starting its own.
    """
    old_proxy = _alive_pid(proxy_pid_file)
    for address in addresses:
        if old_proxy is not None and address.proxy:
            continue
        parsed = urlparse(address.url)
        host = parsed.hostname or ""  # "": every address
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as node and tornado bind: TIME_WAIT is no owner
            try:
                s.bind((host, port))
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    why = f"another program holds it (`ss -ltnp 'sport = :{port}'` names it): stop that program"
                else:
                    why = f"{e.strerror or e}: fix that"
                raise RoomError(f"cannot listen on port {port} ({address.what}, {address.url}): {why}, or start "
                                f"the hub with {address.move}") from None


def _alive_pid(pid_file: Path | None) -> int | None:
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, 0)
    except (AttributeError, OSError, ValueError):
        return None
    return pid


def writable_cache_warning(room: Room) -> str | None:
    """A warning when learners (who run as the hub's user here) could write into the shared cache."""
    if room.cache.is_dir() and os.access(room.cache, os.W_OK):
        return (f"the shared cache {room.cache} is writable by the learners (they run as this user): make it "
                f"read-only, e.g. `chmod -R a-w {room.cache}` as its owner")
    return None


def kernel_cache_warning(room: Room) -> str | None:
    """A warning when the room's kernel cache is missing, not prepared for this CPU, the learners' threads and
    the room's models, or writable by the learners (who would then hand every kernel the code they put there).

    Without it every learner's kernel compiles the decode kernels and measures their plans itself, all at
    once: each measurement slowed by the others, and the worse plan kept for good (``qwen_lab.shared_cache``).
    """
    from qwen_lab.shared_cache import missing
    models = list(dict.fromkeys([room.model, *room.real_models]))
    lacking = missing(room.kernel_cache, models, room.threads, room.cache)
    if lacking is not None:
        return (f"the room's kernel cache {lacking}: every learner will compile the kernels and measure their plans "
                f"at once; fill it while the server is quiet, as root: `qwen-lab tune --kernel-cache "
                f"{room.kernel_cache} --threads {room.threads} --cache-dir {room.cache} {' '.join(models)}`")
    if os.access(room.kernel_cache, os.W_OK):
        return (f"the room's kernel cache {room.kernel_cache} is writable by the learners (they run as this user): "
                f"make it read-only, e.g. `chmod -R a-w {room.kernel_cache}` as its owner")
    return None


#: The kit's parts that learners' servers and kernels run or open: the package, what learner_start.py copies and
#: links, and the workshop's scripts (learner_start.py runs at every learner's start).
KIT_PARTS = ("qwen_lab", "training", "notebooks", "README.md", "workshop")


def writable_kit_warning(kit: Path = REPO) -> str | None:
    """A warning when learners (who run as the hub's user here) could change the kit itself.

    Every kernel imports ``qwen_lab`` from the kit (an editable install), and each learner's home
    links to its files (``learner_start.py``): a learner who opens ``qwen_lab/generation.py`` in
    JupyterLab and lets it autosave would change it for the whole room, if the file is writable.
    Nothing writes into the kit at run time (compiled kernels go to ``~/.cache/qwen_lab``; Python
    skips a ``__pycache__`` it cannot write), so it can belong to root, read-only to everyone else.
    """
    for part in (kit, *(kit / name for name in KIT_PARTS)):
        paths = [part] if part == kit or not part.is_dir() else [part, *sorted(part.rglob("*"))]
        writable = next((p for p in paths if p.exists() and not p.is_symlink() and os.access(p, os.W_OK)), None)
        if writable is not None:
            where = "" if writable == kit else f" ({writable}, for one)"
            return (f"the kit {kit} is writable by the learners, who run as this user{where}: a change there "
                    f"reaches every learner's kernel; as root: `chown -R root: {kit} && chmod -R a+rX,go-w {kit}`")
    return None
