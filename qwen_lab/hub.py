"""Step 1 — download: find every file a chat model needs, from the Hub or a folder.

A Qwen2.5-Instruct repository holds:

* ``config.json`` — the architecture and its sizes;
* ``tokenizer.json`` — the vocabulary and merges;
* ``tokenizer_config.json`` — the special tokens and the ``chat_template``
  (newer repositories may ship it as ``chat_template.jinja`` instead);
* ``generation_config.json`` — sampling defaults and the EOS ids;
* the weights: one ``model.safetensors``, or for large models
  ``model.safetensors.index.json`` whose ``weight_map`` names the shards.

Downloads go through huggingface_hub's own ``hf_hub_download``, so its cache,
revisions, tokens, progress bars and ``HF_HUB_OFFLINE`` all apply.

>>> files = resolve("qwen-lab/tiny-chat")   # the embedded model: no network
>>> files.config.name
'config.json'
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DownloadError

#: The model this package ships, resolved without any network.
EMBEDDED_MODEL_ID = "qwen-lab/tiny-chat"
EMBEDDED_MODEL_DIR = Path(__file__).parent / "models" / "tiny-chat"

REQUIRED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")
OPTIONAL_FILES = ("generation_config.json", "chat_template.jinja")
SINGLE_WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"


@dataclass
class ModelFiles:
    """Local paths of a model's files (``None`` for an optional file the repo lacks)."""

    root: Path
    config: Path
    tokenizer: Path
    tokenizer_config: Path
    generation_config: Path | None
    chat_template: Path | None
    weights: list[Path] = field(default_factory=list)
    weights_index: Path | None = None
    model_id: str = ""

    @property
    def sharded(self) -> bool:
        return self.weights_index is not None


def shard_names(index_path: str | Path) -> list[str]:
    """The shard files an index's ``weight_map`` names, each once, in order.

    The map goes tensor name -> file, so the same shard appears many times.
    """
    try:
        weight_map = json.loads(Path(index_path).read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DownloadError(f"{index_path} is not a valid safetensors index ({e}); download it again") from e
    return sorted(set(weight_map.values()))


def resolve(model: str | os.PathLike, revision: str | None = None, *, cache_dir: str | os.PathLike | None = None,
            token: str | bool | None = None, local_files_only: bool | None = None,
            endpoint: str | None = None) -> ModelFiles:
    """Local paths of every file ``model`` needs, downloading what is missing.

    ``model`` is a local directory, the embedded ``qwen-lab/tiny-chat``, or a
    Hub repo id such as ``Qwen/Qwen2.5-1.5B-Instruct``. ``local_files_only``
    defaults to ``HF_HUB_OFFLINE``; ``endpoint`` defaults to ``HF_ENDPOINT``.
    """
    name = str(model)
    if name == EMBEDDED_MODEL_ID:
        return _from_directory(EMBEDDED_MODEL_DIR, name)
    path = Path(name).expanduser()
    if path.is_dir():
        return _from_directory(path, name)
    if path.exists() or name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise DownloadError(f"{name!r} is neither a model directory nor a Hub repo id like 'Qwen/Qwen2.5-1.5B-Instruct'")
    return _from_hub(name, revision, cache_dir, token, local_files_only, endpoint)


def _from_directory(root: Path, model_id: str) -> ModelFiles:
    def need(filename: str) -> Path:
        p = root / filename
        if not p.is_file():
            raise DownloadError(f"{root} has no {filename}: a model directory needs "
                                f"{', '.join(REQUIRED_FILES)} and {SINGLE_WEIGHTS} (or {WEIGHTS_INDEX} with its shards)")
        return p

    def maybe(filename: str) -> Path | None:
        p = root / filename
        return p if p.is_file() else None

    found = {f: need(f) for f in REQUIRED_FILES}
    if (root / SINGLE_WEIGHTS).is_file():
        weights, index = [root / SINGLE_WEIGHTS], None
    elif (root / WEIGHTS_INDEX).is_file():
        index = root / WEIGHTS_INDEX
        weights = [need(s) for s in shard_names(index)]
    else:
        need(SINGLE_WEIGHTS)  # raises with the list of what is needed
    return ModelFiles(root=root, config=found["config.json"], tokenizer=found["tokenizer.json"],
                      tokenizer_config=found["tokenizer_config.json"],
                      generation_config=maybe("generation_config.json"),
                      chat_template=maybe("chat_template.jinja"),
                      weights=weights, weights_index=index, model_id=model_id)


def _from_hub(repo_id, revision, cache_dir, token, local_files_only, endpoint) -> ModelFiles:
    # Imported here: resolving the embedded model or a folder needs no HTTP stack.
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    offline = constants.HF_HUB_OFFLINE if local_files_only is None else local_files_only
    where = endpoint or constants.ENDPOINT

    def fetch(filename: str, required: bool = True) -> Path | None:
        try:
            return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir, token=token,
                                        local_files_only=offline, endpoint=endpoint))
        except GatedRepoError as e:
            raise DownloadError(f"{repo_id} is gated: accept its licence on its Hub page, then log in "
                                f"(`hf auth login`) or set HF_TOKEN") from e
        except RepositoryNotFoundError as e:
            raise DownloadError(f"no repository {repo_id!r} on {where} (or it is private): check the id, "
                                f"or log in (`hf auth login`) if it is yours") from e
        except RevisionNotFoundError as e:
            raise DownloadError(f"{repo_id} has no revision {revision!r}: use a branch, tag or commit it has") from e
        except EntryNotFoundError as e:  # also LocalEntryNotFoundError: not cached, or no network
            if not required:
                return None
            if isinstance(e, LocalEntryNotFoundError):
                how = "offline mode is on (HF_HUB_OFFLINE)" if offline else f"{where} cannot be reached"
                raise DownloadError(f"{repo_id}/{filename} is not in the local cache and {how}: download it once "
                                    f"with network (`qwen-lab download --model {repo_id}`), pass a local "
                                    f"directory, or use the embedded model {EMBEDDED_MODEL_ID}") from e
            raise DownloadError(f"{repo_id} has no {filename}: is it a chat model in the Hugging Face "
                                f"format (config.json, tokenizer.json, safetensors weights)?") from e

    found = {f: fetch(f) for f in REQUIRED_FILES}
    optional = {f: fetch(f, required=False) for f in OPTIONAL_FILES}
    single = fetch(SINGLE_WEIGHTS, required=False)
    if single is not None:
        weights, index = [single], None
    else:
        index = fetch(WEIGHTS_INDEX, required=False)
        if index is None:
            fetch(SINGLE_WEIGHTS)  # raises the right error: not cached, or not in the repo
        weights = [fetch(s) for s in shard_names(index)]
    return ModelFiles(root=found["config.json"].parent, config=found["config.json"],
                      tokenizer=found["tokenizer.json"], tokenizer_config=found["tokenizer_config.json"],
                      generation_config=optional["generation_config.json"],
                      chat_template=optional["chat_template.jinja"],
                      weights=weights, weights_index=index, model_id=repo_id)


#: The walkthrough's model, used when it can be had.
WALKTHROUGH_MODEL_ID = "Qwen/Qwen2.5-1.5B-Instruct"


def choose_model(timeout: float = 3.0, *, endpoint: str | None = None, cache_dir: str | None = None) -> tuple[str, str]:
    """The model the notebooks use, and why: ``(model_id, reason)``.

    1. ``QWEN_LAB_MODEL`` if set;
    2. else the real Qwen2.5-1.5B-Instruct if its files are in the cache, or
       if the Hub answers within ``timeout`` seconds (never a hang offline);
    3. else the embedded ``qwen-lab/tiny-chat``.
    """
    chosen = os.environ.get("QWEN_LAB_MODEL")
    if chosen:
        return chosen, "chosen by QWEN_LAB_MODEL"
    from huggingface_hub import constants, try_to_load_from_cache
    repo = WALKTHROUGH_MODEL_ID
    cached = [try_to_load_from_cache(repo, f, cache_dir=cache_dir) for f in (*REQUIRED_FILES, SINGLE_WEIGHTS)]
    if all(isinstance(c, str) for c in cached):
        return repo, "found in the Hugging Face cache"
    if not constants.HF_HUB_OFFLINE and _hub_answers(endpoint or constants.ENDPOINT, repo, timeout):
        return repo, "the Hub answered; it will be downloaded (about 3 GB)"
    return EMBEDDED_MODEL_ID, "the embedded model: the Hub cannot be reached and the real model is not cached"


def _hub_answers(endpoint: str, repo: str, timeout: float) -> bool:
    """True if ``endpoint`` serves the repo's config.json within ``timeout`` seconds (DNS included)."""
    import threading
    import urllib.request
    answer = []

    def probe():
        try:
            request = urllib.request.Request(f"{endpoint}/{repo}/resolve/main/config.json", method="HEAD")
            with urllib.request.urlopen(request, timeout=timeout) as response:
                answer.append(response.status < 400)
        except Exception:  # no network, refused, DNS failure, HTTP error: all mean "no"
            answer.append(False)

    thread = threading.Thread(target=probe, daemon=True)  # a DNS lookup ignores socket timeouts
    thread.start()
    thread.join(timeout)
    return bool(answer and answer[0])
