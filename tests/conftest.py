"""Fixtures: tiny Qwen2 checkpoints made on the fly, and the reference files of the real models."""
import threading
from pathlib import Path

import pytest

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
    """``tuning._cpu_now`` on a machine made up for a test: each read a second after the one before, in which
    this process took ``own`` cores and other programs ``others`` (``steal`` of them: a hypervisor running its
    other guests); /proc/stat's text as Linux writes it, in its clock ticks."""

    def __init__(self, others: float = 0.0, steal: float = 0.0, own: float = 1.5):
        self.others, self.steal, self.own = others, steal, own
        self.clock, self.user, self.stolen, self.mine = 1000.0, 500_000, 0, 20.0

    def __call__(self) -> tuple[float, str, float]:
        import os
        hz = os.sysconf("SC_CLK_TCK")
        self.clock += 1
        self.user += round((self.own + self.others - self.steal) * hz)
        self.stolen += round(self.steal * hz)
        self.mine += self.own
        return (self.clock, f"cpu  {self.user} 120 9000 800000 300 0 40 {self.stolen} 0 0\n"
                            f"cpu0 {self.user // 2} 60 4500 400000 150 0 20 {self.stolen // 2} 0 0\n", self.mine)


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


def vm_flags(address: int) -> list[str] | None:
    """The VmFlags of this process's mapping holding ``address`` (None: no mapping holds it)."""
    found = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0] if line else ""
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(x, 16) for x in head.split("-"))
            found = lo <= address < hi
        elif found and line.startswith("VmFlags:"):
            return line.split()[1:]
    return None
