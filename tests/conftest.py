"""Fixtures: tiny Qwen2 checkpoints made on the fly, and the reference files of the real models."""
import contextlib
import os
import resource
import signal
import threading
from pathlib import Path

import pytest

from qwen_lab import kernels
from qwen_lab.tiny import build_random, save_checkpoint, tiny_config, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
# The real models' config files (shared/reference beside the checkout, or inside it). A learner's
# clone may have neither: tests that need them skip, the others use the verbatim copies in the repo.
REFERENCE = next((p for p in (ROOT.parent / "shared" / "reference", ROOT / "shared" / "reference") if p.is_dir()),
                 ROOT.parent / "shared" / "reference")


def reference_file(model: str, name: str) -> Path:
    path = REFERENCE / model / name
    if not path.is_file():
        pytest.skip(f"{path} is not here (the real models' reference files)")
    return path


class FakeMachine:
    """``tuning._cpu_now`` on a machine made up for a test, with ``cpus`` CPUs, all of them this process's: each
    read a second after the one before, in which this process took ``own`` cores and other programs ``others``
    (``steal`` of them: a hypervisor running its other guests), spread evenly over the CPUs, or over ``on``
    alone; /proc/stat's text as Linux writes it, in its clock ticks. ``install`` puts it in ``tuning``'s place,
    with the kernels on ``threads`` threads and ``quiet_now`` watching no time."""

    def __init__(self, others: float = 0.0, steal: float = 0.0, own: float = 1.5, cpus: int = 2,
                 on: set[int] | None = None, ours: set[int] | None = None):
        self.others, self.steal, self.own, self.cpus, self.on = others, steal, own, cpus, on
        self.ours = set(range(cpus)) if ours is None else ours
        self.clock, self.mine = 1000.0, 20.0
        self.user, self.stolen = [500_000] * cpus, [0] * cpus

    def __call__(self) -> tuple[float, str, float, set[int]]:
        hz = os.sysconf("SC_CLK_TCK")
        self.clock += 1
        self.mine += self.own
        on = sorted(self.on if self.on is not None else range(self.cpus))
        mine_on = [cpu for cpu in range(self.cpus) if cpu in self.ours] or list(range(self.cpus))
        for cpu in range(self.cpus):
            mine = self.own / len(mine_on) if cpu in mine_on else 0.0
            theirs = (self.others - self.steal) / len(on) if cpu in on else 0.0
            self.user[cpu] += round((mine + theirs) * hz)
            self.stolen[cpu] += round(self.steal / len(on) * hz) if cpu in on else 0
        lines = [f"cpu  {sum(self.user)} 120 9000 800000 300 0 40 {sum(self.stolen)} 0 0"]
        lines += [f"cpu{cpu} {self.user[cpu]} 60 4500 400000 150 0 20 {self.stolen[cpu]} 0 0" for cpu in range(self.cpus)]
        return self.clock, "\n".join(lines) + "\nintr 12345 0 1\nctxt 999\n", self.mine, set(self.ours)

    def install(self, monkeypatch, threads: int = 2) -> "FakeMachine":
        from qwen_lab import kernels, tuning
        monkeypatch.setattr(tuning, "_cpu_now", self)
        monkeypatch.setattr(tuning, "QUIET_CHECK_S", 0)
        monkeypatch.setattr(kernels, "num_threads", lambda: threads)
        return self


@pytest.fixture
def machine(monkeypatch):
    """The machine as ``tuning`` sees it (``FakeMachine``, 2 CPUs, the kernels on both): quiet, until a test
    makes it busy."""
    return FakeMachine().install(monkeypatch)


def stop_a_long_reply(chat, timeout: float = 30):
    """A chat panel that never stops by itself, asked for a long story and stopped once text has
    streamed, as a learner clicks Stop; returns the panel after its worker has finished."""
    import time
    from qwen_lab.panel import ChatPanel
    panel = ChatPanel(chat, refresh_s=0.01, eos_token_id=[])
    panel.max_new_tokens.value = 400
    panel.send("Tell me a long story")
    deadline = time.time() + timeout
    while not panel._partial and time.time() < deadline:
        time.sleep(0.005)
    panel.stop_button.click()
    panel.wait(timeout)
    return panel


SAMPLE_TEXTS = [
    "Hello! How are you today? I am a small model.",
    "The capital of France is Paris. The capital of Italy is Rome.",
    "你好，世界！今天天氣很好。 🌞 emoji and 中文 stream fine.",
    "def add(a, b):\n    return a + b\n",
    "<tools> {\"name\": \"get_weather\"} </tools> & <b>bold</b>",
] * 4


def refusal_within(call, error, seconds: float = 20) -> str | None:
    """The message of the ``error`` that ``call()`` raises within ``seconds``, else None.

    Run in a daemon thread: a call that blocks forever (the open of a pipe waits for a writer) fails
    the test instead of hanging the suite.
    """
    outcome = []

    def attempt():
        try:
            call()
        except error as e:
            outcome.append(str(e))

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(seconds)
    return outcome[0] if outcome else None


def qwen_template() -> str:
    """Qwen2.5-Instruct's chat template (a verbatim copy; test_reference_copies checks it)."""
    return (ROOT / "training" / "qwen2.5_chat_template.jinja").read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer(SAMPLE_TEXTS, 400)


def make_checkpoint(directory, tokenizer, *, tie=True, shards=1, seed=0, dtype=None, **sizes):
    import torch
    config = tiny_config(tokenizer.get_vocab_size(), tie=tie, **sizes)
    model = build_random(config, seed=seed, std=0.1)
    return save_checkpoint(model, directory, tokenizer=tokenizer, chat_template=qwen_template(), shards=shards,
                           dtype=dtype or torch.float32)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tokenizer):
    """A tied, single-file, float32 checkpoint."""
    return make_checkpoint(tmp_path_factory.mktemp("tiny"), tokenizer)


@pytest.fixture(scope="session")
def untied_dir(tmp_path_factory, tokenizer):
    return make_checkpoint(tmp_path_factory.mktemp("untied"), tokenizer, tie=False, seed=1)


@pytest.fixture(scope="session")
def sharded_dir(tmp_path_factory, tokenizer):
    return make_checkpoint(tmp_path_factory.mktemp("sharded"), tokenizer, shards=3, seed=2)


@pytest.fixture
def online(monkeypatch):
    """Let huggingface_hub make requests, whatever HF_HUB_OFFLINE says: these tests only reach 127.0.0.1."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def _smaps_entry(address: int, field: str) -> list[str] | None:
    """The words after ``field:`` in /proc/self/smaps for this process's mapping holding ``address`` (None: no
    mapping holds it)."""
    found = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0] if line else ""
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(x, 16) for x in head.split("-"))
            found = lo <= address < hi
        elif found and line.startswith(field + ":"):
            return line.split()[1:]
    return None


def vm_flags(address: int) -> list[str] | None:
    """The VmFlags of this process's mapping holding ``address`` (None: no mapping holds it)."""
    return _smaps_entry(address, "VmFlags")


def resident_kib(address: int) -> int | None:
    """KiB of the mapping holding ``address`` in memory now (its Rss; None: no mapping holds it)."""
    entry = _smaps_entry(address, "Rss")
    return None if entry is None else int(entry[0])


# In CI the C kernels must be built and tested, not skipped (.ci/run sets this).
KERNELS_REQUIRED = os.environ.get("QWEN_LAB_REQUIRE_KERNELS") == "1"
needs_kernel = pytest.mark.skipif(not KERNELS_REQUIRED and not kernels.available(),
                                  reason=f"C kernel: {kernels.status()}")


def tree(folder):
    """Every entry under ``folder`` with its size, mode and modification time: to see that nothing changed."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mode, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


@contextlib.contextmanager
def files_cut_at(size: int):
    """Every file this process and its children write stops at ``size`` bytes, the next write failing as on a full
    disk (EFBIG, "File too large", where a full disk says ENOSPC): the limit RLIMIT_FSIZE, which root obeys too."""
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of killing the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, handler)


def read_only(folder):
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)


def rewrite_in_place(path: Path) -> None:
    """``path`` written again as ``cp`` over it writes: cut to nothing, then its bytes (the same ones), a newer
    modification time (a test sets an old one first: within one clock tick it could read the same)."""
    data = path.read_bytes()
    with open(path, "r+b") as f:
        f.truncate(0)
        f.write(data)
