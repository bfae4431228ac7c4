"""JupyterHub for a room of learners on one server.

    export QWEN_LAB_HUB_PASSWORD='the room password' QWEN_LAB_HUB_CACHE=/srv/qwen-lab/hf-cache
    jupyterhub -f workshop/jupyterhub_config.py          # or: make hub

Learners open http://SERVER:8000, type any name and the room's password, and land in JupyterLab
on their own copy of the notebooks. Every setting is an environment variable of the hub (listed
in ``room.py``); ``docs/workshop.md`` walks through the setup. What each learner gets:

* **their own folder** (``QWEN_LAB_HUB_HOMES``) holding a copy of the notebooks, made at each
  start by ``learner_start.py`` without overwriting their edits;
* **the same model**: ``QWEN_LAB_MODEL``, by default the embedded tiny-chat (notebooks 01-06, the
  committed outputs); the real models learners switch to for 07 (``QWEN_LAB_HUB_REAL_MODELS``)
  are read from one shared cache: ``HF_HUB_CACHE`` points at the folder filled once by ``qwen-lab
  download --cache-dir``, and ``HF_HUB_OFFLINE=1``, so no kernel waits for the Hub or writes its
  own copy. A bf16 model stays memory-mapped from that file, so all the learners' kernels share one
  copy of the weights in memory;
* **a thread count** sized as the server's cores / learners (``QWEN_LAB_THREADS``);
* **the room's decode kernels**, compiled and measured once by ``qwen-lab tune`` into
  ``QWEN_LAB_HUB_KERNEL_CACHE``, read through ``QWEN_LAB_SHARED_CACHE`` instead of 30 kernels
  compiling and measuring at once (what it lacks, each learner builds in ``~/.cache/qwen_lab``).

The spawner is JupyterHub's ``SimpleLocalProcessSpawner``: each learner's server is a process of
the hub's own Unix user, with its own home folder. Learners are not isolated from one another
(nor are they with a shared password, which lets anyone log in under any name): this suits a
machine used for the workshop only, with the hub run by a dedicated unprivileged user. For
per-learner Unix users and CPU/memory limits use Kubernetes (``z2jh/``) or The Littlest
JupyterHub's systemd spawner (docs/workshop.md, "Beyond one server").
"""
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import room  # noqa: E402  (room.py, beside this file)

c = get_config()  # noqa: F821  (JupyterHub defines it for its config files)

try:
    settings = room.Room.from_environ(os.environ)
    proxy = room.find_proxy(os.environ)
    room.check(settings)
    from jupyterhub.app import JupyterHub
    if JupyterHub.initialized():  # the hub being started, its command line (--port ...) applied
        room.check_ports(room.listening(JupyterHub.instance()), settings.proxy_pid_file)
except room.RoomError as error:  # one line, before JupyterHub starts anything
    sys.exit(f"jupyterhub_config.py: error: {error}")

# --- who comes in: anyone with the room's password, under the name they type
c.JupyterHub.authenticator_class = "shared-password"
c.SharedPasswordAuthenticator.user_password = settings.password
c.Authenticator.allow_all = True
c.Authenticator.username_pattern = room.USERNAME_PATTERN  # a name becomes a folder name
if settings.admin_password:
    c.SharedPasswordAuthenticator.admin_password = settings.admin_password
    c.Authenticator.admin_users = {room.ADMIN_USER}

# --- each learner's server: a local process, in the learner's own folder
c.JupyterHub.spawner_class = "simple"  # jupyterhub.spawner.SimpleLocalProcessSpawner
c.SimpleLocalProcessSpawner.home_dir_template = settings.homes
c.Spawner.cmd = [sys.executable, str(HERE / "learner_start.py")]  # the kit's Python, and its Jupyter
c.Spawner.environment = room.learner_environment(settings)
c.Spawner.default_url = "/lab/tree/notebooks/01_download.ipynb"
if settings.allow_root:
    c.Spawner.args = ["--ServerApp.allow_root=True"]
# Thirty learners logging in at once start thirty Pythons: give them time.
c.Spawner.start_timeout = 180
c.Spawner.http_timeout = 180
# ... and thirty ports: JupyterHub's own pick can give two of them the same one (room.PortBook).
_ports = room.PortBook(hold=c.Spawner.start_timeout + 60)


def _own_port(spawner) -> None:
    spawner.port = _ports.take()


c.Spawner.pre_spawn_hook = _own_port

# --- the hub's own files, and its proxy (npm's configurable-http-proxy)
c.JupyterHub.db_url = f"sqlite:///{settings.state / 'jupyterhub.sqlite'}"
c.JupyterHub.cookie_secret_file = str(settings.state / "jupyterhub_cookie_secret")
c.ConfigurableHTTPProxy.command = [proxy]
c.ConfigurableHTTPProxy.pid_file = str(settings.proxy_pid_file)
# Stopping the hub stops every learner's server and the proxy (JupyterHub's defaults, stated).
c.JupyterHub.cleanup_servers = True
c.JupyterHub.cleanup_proxy = True

for warning in (room.writable_cache_warning(settings), room.kernel_cache_warning(settings),
                room.writable_kit_warning(room.REPO)):
    if warning:
        print(f"jupyterhub_config.py: warning: {warning}", file=sys.stderr)
