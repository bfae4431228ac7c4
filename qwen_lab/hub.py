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

What arrives is untrusted, so nothing counts before it is checked: a file
fetched from the Hub must hash to the name the Hub gave it, a model folder may
only name files inside itself, a revision must be a branch, tag or commit
name, and every network wait is bounded (the plumbing is in ``hub_guard``).

>>> files = resolve("qwen-lab/tiny-chat")   # the embedded model: no network
>>> files.config.name
'config.json'
"""
from __future__ import annotations

import errno
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CheckpointError, DownloadError, QwenLabError
from .hub_guard import (Corrupt, GaveUp, blob_names, blob_of, check_blob, is_plain_relative, is_repo_id,
                        remove_from_cache, revision_problem, watched)

#: The model this package ships, resolved without any network.
EMBEDDED_MODEL_ID = "qwen-lab/tiny-chat"
EMBEDDED_MODEL_DIR = Path(__file__).parent / "models" / "tiny-chat"

REQUIRED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")
OPTIONAL_FILES = ("generation_config.json", "chat_template.jinja")
SINGLE_WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"

#: config.json, tokenizer_config.json, generation_config.json, chat_template.jinja, a shard index: a few kB
#: (Gemma 3's tokenizer_config.json, among the largest, 1.2 MB; a 70B model's index a few hundred kB); a
#: bigger one is refused unread, as parsing it could take all the memory.
MAX_JSON_BYTES = 16 * 2**20


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


def read_json_object(path: str | Path, what: str, error: type[QwenLabError] = CheckpointError) -> dict:
    """A JSON file of a model that must hold an object, or one line (``error``) naming the file.

    Model files are untrusted: not UTF-8, not JSON, nested thousands deep, gigabytes long, or a
    list where an object belongs each get that one line, never a traceback.
    """
    path = Path(path)
    raw, size = read_bounded(path, MAX_JSON_BYTES, error)
    if raw is None:
        raise error(f"{path} is {size / 2**20:,.0f} MB, far too large for {what} (at most "
                    f"{MAX_JSON_BYTES // 2**20} MB): it is not a model's file; download the model again")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # also bad UTF-8, and JSON nested thousands deep
        reason = "it is nested too deeply" if isinstance(e, RecursionError) else str(e).splitlines()[0]
        raise error(f"{path} is not valid JSON ({reason}); download the model again") from None
    if not isinstance(data, dict):
        raise error(f"{path} must hold a JSON object ({what}), not a {type(data).__name__}; "
                    f"download the model again")
    return data


def open_regular(path: str | Path, error: type[QwenLabError] = CheckpointError):
    """``path`` opened for reading (binary), only if it is a regular file; else one line (``error``).

    A model's file may be a pipe, whose ``open`` waits forever for a writer, or a device that
    never ends. Opening without blocking lets the type be checked on the opened file itself,
    so nothing can be swapped in between the check and the read.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise error(f"{path} is not a regular file (a folder, a pipe or a device): a model's files are plain files")
    return os.fdopen(fd, "rb")


def read_bounded(path: str | Path, limit: int, error: type[QwenLabError] = CheckpointError,
                 advice: str = "download the model again") -> tuple[bytes | None, int]:
    """The bytes of a model's small file and its size; ``(None, size)`` when it is over ``limit`` bytes.

    The file is untrusted: a pipe is refused rather than waited on (``open_regular``), and a file
    too large to be what it claims is refused unread, before it can take the memory; one growing
    while it is read counts as too large. A file that cannot be read is one line (``error``)
    ending in ``advice``.
    """
    try:
        with open_regular(path, error) as f:
            size = os.fstat(f.fileno()).st_size
            data = f.read(limit + 1) if size <= limit else None
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror or e}; {advice}") from e
    if data is not None and len(data) > limit:
        return None, len(data)
    return data, size


def shard_names(index_path: str | Path) -> list[str]:
    """The shard files an index's ``weight_map`` names, each once, in order.

    The map goes tensor name -> file, so the same shard appears many times. The
    index is untrusted: every name must be a ``.safetensors`` file inside the
    model folder (no ``/etc/passwd``, no ``../``).
    """
    path = Path(index_path)
    raw, _ = read_bounded(path, MAX_JSON_BYTES, DownloadError, "download it again")
    if raw is None:
        raise DownloadError(f"{path} is over {MAX_JSON_BYTES // 2**20} MB: not a safetensors index")
    try:
        weight_map = json.loads(raw.decode("utf-8"))["weight_map"]
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        reason = "it is nested too deeply" if isinstance(e, RecursionError) else e
        raise DownloadError(f"{path} is not a valid safetensors index ({reason}); download it again") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise DownloadError(f"{path}: 'weight_map' must map each tensor name to its shard file, "
                            f"but it is {_describe_json(weight_map)}; download the index again")
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str):
            raise DownloadError(f"{path}: 'weight_map' maps {tensor[:80]!r} to {_describe_json(shard)}, "
                                f"not to a shard file name; download the index again")
    names = sorted(set(weight_map.values()))
    for name in names:
        if not is_plain_relative(name) or not name.endswith(".safetensors"):
            raise DownloadError(f"{path} names the shard {name[:100]!r}, which is not a .safetensors file inside "
                                f"the model folder: refusing it (shards look like 'model-00001-of-00002.safetensors')")
    return names


def resolve(model: str | os.PathLike, revision: str | None = None, *, cache_dir: str | os.PathLike | None = None,
            token: str | bool | None = None, local_files_only: bool | None = None,
            endpoint: str | None = None, force_download: bool = False, check_cache: bool = False,
            timeout: float | None = None) -> ModelFiles:
    """Local paths of every file ``model`` needs, downloading what is missing.

    ``model`` is a local directory, the embedded ``qwen-lab/tiny-chat``, or a
    Hub repo id such as ``Qwen/Qwen2.5-1.5B-Instruct``. ``local_files_only``
    defaults to ``HF_HUB_OFFLINE``; ``endpoint`` defaults to ``HF_ENDPOINT``.

    A file downloaded now is hashed before it counts (one more read of it:
    about 1 s per GB); one whose bytes are wrong is removed from the cache.
    ``check_cache=True`` also hashes the files that were already cached, and
    fetches a bad one again (what ``qwen-lab download`` does);
    ``force_download=True`` fetches every file afresh. ``timeout`` bounds each
    wait for the server, in seconds (default ``HF_HUB_ETAG_TIMEOUT`` for the
    ``HEAD`` of a file, ``HF_HUB_DOWNLOAD_TIMEOUT`` for its bytes: 10 s each).
    """
    name = str(model)
    _check_revision(revision)
    if name == EMBEDDED_MODEL_ID:
        return _from_directory(EMBEDDED_MODEL_DIR, name)
    path = _local_path(name)
    if path.is_dir():
        return _from_directory(path, name)
    if path.exists() or not is_repo_id(name):
        raise DownloadError(f"{name!r} is neither a model directory nor a Hub repo id like 'Qwen/Qwen2.5-1.5B-Instruct'")
    return _from_hub(name, revision, cache_dir, token, local_files_only, endpoint, force_download, check_cache,
                     timeout)


def _from_directory(root: Path, model_id: str) -> ModelFiles:
    def need(filename: str) -> Path:
        p = _inside(root, filename)
        if p.exists() and not p.is_file():  # a folder, a pipe, a device: "has no" would send one looking for it
            raise DownloadError(f"{p} is not a regular file (a folder, a pipe or a device): a model's files are "
                                f"plain files; replace it with the real {filename}")
        if not p.is_file():
            raise DownloadError(f"{root} has no {filename}: a model directory needs "
                                f"{', '.join(REQUIRED_FILES)} and {SINGLE_WEIGHTS} (or {WEIGHTS_INDEX} with its shards)")
        return p

    def maybe(filename: str) -> Path | None:
        p = _inside(root, filename)
        return p if p.is_file() else None

    found = {f: need(f) for f in REQUIRED_FILES}
    if maybe(SINGLE_WEIGHTS):
        weights, index = [need(SINGLE_WEIGHTS)], None
    elif maybe(WEIGHTS_INDEX):
        index = need(WEIGHTS_INDEX)
        weights = [need(s) for s in shard_names(index)]
    else:
        need(SINGLE_WEIGHTS)  # raises with the list of what is needed
    return ModelFiles(root=root, config=found["config.json"], tokenizer=found["tokenizer.json"],
                      tokenizer_config=found["tokenizer_config.json"],
                      generation_config=maybe("generation_config.json"),
                      chat_template=maybe("chat_template.jinja"),
                      weights=weights, weights_index=index, model_id=model_id)


def _from_hub(repo_id, revision, cache_dir, token, local_files_only, endpoint, force_download, check_cache,
              timeout) -> ModelFiles:
    # Imported here: resolving the embedded model or a folder needs no HTTP stack.
    from huggingface_hub import constants
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    offline = constants.HF_HUB_OFFLINE if local_files_only is None else local_files_only
    where = endpoint or constants.ENDPOINT
    cache = Path(cache_dir or constants.HF_HUB_CACHE).expanduser()
    rerun = f"`qwen-lab download --model {repo_id}" + (f" --cache-dir {cache}`" if cache_dir else "`")
    if force_download and offline:
        raise DownloadError("a forced download needs the network, and offline mode is on (HF_HUB_OFFLINE): "
                            "unset it, or drop --force-download")
    if cache.exists() and not cache.is_dir():
        raise DownloadError(f"the cache {cache} is a file, not a folder: point --cache-dir (HF_HUB_CACHE) at a folder")

    unreachable = False  # once the Hub did not answer, the remaining files come from the cache, without waiting

    def fetch(filename: str, required: bool = True) -> Path | None:
        nonlocal unreachable
        file = f"{repo_id}/{filename}"
        try:
            path, reached = _download(repo_id, filename, revision, cache, token, offline or unreachable, endpoint,
                                      force_download, check_cache, timeout)
            unreachable = unreachable or not reached
            return path
        except GatedRepoError as e:
            raise DownloadError(f"{repo_id} is gated: accept its licence on its Hub page, then log in "
                                f"(`hf auth login`) or set HF_TOKEN") from e
        except RepositoryNotFoundError as e:
            raise DownloadError(f"no repository {repo_id!r} on {where} (or it is private): check the id, "
                                f"or log in (`hf auth login`) if it is yours") from e
        except RevisionNotFoundError as e:
            raise DownloadError(f"{repo_id} has no revision {revision!r} on {where}: use a branch, tag or commit "
                                f"it has (its Hub page lists them under 'Files and versions')") from e
        except EntryNotFoundError as e:  # also LocalEntryNotFoundError: not cached, or no network
            if not required:
                return None
            if isinstance(e, LocalEntryNotFoundError):
                how = "offline mode is on (HF_HUB_OFFLINE)" if offline else f"{where} cannot be reached"
                raise DownloadError(f"{file} is not in the local cache and {how}: download it once with network "
                                    f"({rerun}), pass a local directory, or use the embedded model "
                                    f"{EMBEDDED_MODEL_ID}") from e
            raise DownloadError(f"{repo_id} has no {filename}: is it a chat model in the Hugging Face "
                                f"format (config.json, tokenizer.json, safetensors weights)?") from e
        except GaveUp as e:
            raise DownloadError(_network_problem(e, file, where)) from e
        except Corrupt as e:
            raise DownloadError(f"{file} {'arrived' if e.fresh else 'was found'} corrupted: {e}; it was removed from "
                                f"the cache: run the download again to fetch it afresh (if it keeps happening, "
                                f"something between you and {where} alters it)") from e
        except HfHubHTTPError as e:
            status = e.response.status_code if e.response is not None else "an error"
            raise DownloadError(f"{where} answered HTTP {status} for {file}: run the command again later "
                                f"(the files already downloaded are kept)") from e
        except OSError as e:
            raise DownloadError(_disk_problem(e, file, cache, rerun)) from e
        except Exception as e:  # anything else the network or huggingface_hub raise: still one line
            cause = e.__cause__ or e  # e.g. "Force download failed due to the above error."
            raise DownloadError(f"downloading {file} from {where} failed ({type(cause).__name__}: "
                                f"{_first_line(cause)}); run the command again (the files already downloaded "
                                f"are kept)") from e

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


def _download(repo_id, filename, revision, cache, token, offline, endpoint, force, check_cache,
              timeout) -> tuple[Path, bool]:
    """One file through ``hf_hub_download``, checked before it counts: ``(its path, whether the Hub answered)``.

    The cache names each blob after the file's hash as the Hub states it, so a
    blob's bytes can be checked against its own name. A blob this call fetched
    (or, with ``check_cache``, one already there) that fails the check is
    removed: a fresh one raises ``Corrupt``, a cached one is fetched again now.
    When the Hub does not answer, huggingface_hub returns the cached copy.
    """
    from huggingface_hub import hf_hub_download

    storage = cache / ("models--" + repo_id.replace("/", "--"))  # huggingface_hub's cache layout

    reached = True

    def fetch_once(force_download: bool) -> tuple[Path, Path | None, bool]:
        nonlocal reached
        before = blob_names(storage)
        with watched(timeout) as watch:
            pointer = Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache, token=token,
                                           local_files_only=offline, endpoint=endpoint, force_download=force_download))
        reached = watch.answered or not watch.tries
        blob = blob_of(pointer)  # None when the cache has no links (Windows): no hash to compare with
        return pointer, blob, blob is not None and (force_download or blob.name not in before)

    pointer, blob, fresh = fetch_once(force)
    if blob is None or not (fresh or check_cache):
        return pointer, reached
    problem = check_blob(blob)
    if problem and not fresh and not offline:  # a bad blob from an earlier download: fetch it again, now
        remove_from_cache(pointer, blob)
        pointer, blob, fresh = fetch_once(False)
        problem = check_blob(blob) if blob else None
    if problem:
        remove_from_cache(pointer, blob)
        raise Corrupt(problem, fresh)
    return pointer, reached


def _network_problem(e, file: str, where: str) -> str:
    """One line for a transfer that gave up (``hub_guard.GaveUp``): what failed, and that a rerun resumes."""
    tries = f"{e.tries} tries"
    if not e.answered:
        return (f"{where} cannot be reached ({e.problem}; {tries}) and {file} is not in the local cache: check "
                f"the network (or HF_ENDPOINT) and run the command again, pass a local directory, or use the "
                f"embedded model {EMBEDDED_MODEL_ID}")
    if e.received:
        of = f" of {e.total:,}" if e.total else ""
        return (f"the download of {file} stopped at {e.received:,}{of} bytes after {tries} ({e.problem}); the "
                f"files already downloaded are kept: run the command again to fetch the rest")
    return (f"{where} did not serve {file}: {e.problem} ({tries}); the files already downloaded are kept: run "
            f"the command again later to fetch the rest")


def _disk_problem(e: OSError, file: str, cache: Path, rerun: str) -> str:
    """One line for a failure to write the cache, or a download huggingface_hub found incomplete."""
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"cannot write to the cache {cache} ({e.strerror}) and {file} is not there yet: fill it once "
                f"where it is writable ({rerun}), or point --cache-dir (HF_HUB_CACHE) at a folder you can write")
    if e.errno == errno.ENOSPC:
        return f"no space left in the cache {cache} for {file}: free some, or point --cache-dir (HF_HUB_CACHE) elsewhere"
    return (f"downloading {file} failed: {_first_line(e)}; nothing of it was kept: run the command again "
            f"(the files already downloaded are kept)")


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def _local_path(name: str) -> Path:
    """``name`` as a local path, ``~`` expanded; a name no path can be is refused in one line."""
    if "\0" in name:
        raise DownloadError(f"{name!r} contains a NUL character: give a model folder or a Hub repo id")
    try:
        path = Path(name).expanduser()
    except RuntimeError:  # "~someone/x" where there is no user "someone"
        user = name[1:].split("/")[0]
        raise DownloadError(f"{name!r}: there is no user {user!r} for '~{user}' to stand for: give the model "
                            f"folder's full path, or a Hub repo id like 'Qwen/Qwen2.5-1.5B-Instruct'") from None
    try:
        path.exists()
    except OSError as e:  # e.g. a name too long for the file system
        raise DownloadError(f"{name[:100]!r} cannot be a model folder ({e.strerror}): give a folder or a Hub repo id") from e
    return path


def _inside(root: Path, name: str) -> Path:
    """``root / name``, refused if it leads outside ``root``.

    A model folder is untrusted input: an index may name ``/etc/passwd`` or
    ``../../x.safetensors``, a file may be a link to anywhere. Links are followed
    only where the Hugging Face cache puts them: a snapshot folder's files link to
    ``../../blobs/<hash>``, so for a snapshot the whole cache counts as inside.
    """
    path = root / name
    home = root
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
        home = root.parent.parent.parent
    try:
        inside = is_plain_relative(name) and path.resolve().is_relative_to(home.resolve())
    except (OSError, RuntimeError):  # a link loop, an unreadable link
        inside = False
    if not inside:
        raise DownloadError(f"{path} leads outside the model folder {root}: refusing to read it "
                            f"(a model folder's files must be inside it)")
    return path


def _check_revision(revision: str | None) -> None:
    """Refuse a revision that is not a branch, tag or commit name, before it is used.

    huggingface_hub stores ``refs/<revision>`` in its cache, so ``../../x`` would
    write outside it. The rules are git's own for a ref name (``git check-ref-format``).
    """
    if revision is None:
        return
    problem = revision_problem(revision)
    if problem:
        raise DownloadError(f"revision {str(revision)[:100]!r} is not a branch, tag or commit name ({problem}): "
                            f"use e.g. 'main', a tag such as 'v1.0', or a 40-hex commit hash")


def _describe_json(value) -> str:
    """What a JSON value is, for a message: "a list", "the number 3"..."""
    if isinstance(value, dict):
        return "an empty object" if not value else "an object"
    kinds = {list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return kinds.get(type(value), f"the number {value!r}" if isinstance(value, (int, float)) else type(value).__name__)


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
