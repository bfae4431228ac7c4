"""Step 1's plumbing: what stands between the network and the cache when ``hub.py`` downloads.

``hub.py`` fetches each file with huggingface_hub's ``hf_hub_download``. Around each call this
module adds three things that huggingface_hub (2.x) does not do on its own:

1. **Bounded waits.** huggingface_hub waits ``HF_HUB_ETAG_TIMEOUT`` (10 s) for a ``HEAD``; when
   nothing is cached it then retries with 60 s per try, six tries: about 6 minutes for a server that
   never answers. A body that stalls is resumed up to 5 times, and forever when every try brings a
   few bytes (a server that ignores ``Range`` and stalls at the same place). Here each request waits
   at most ``HF_HUB_ETAG_TIMEOUT`` (``HEAD``) or ``HF_HUB_DOWNLOAD_TIMEOUT`` (``GET``) seconds for the
   server to answer or send the next bytes (or ``timeout=`` of ``resolve``), and a file is given up
   after ``MAX_TRIES`` failed tries in a row that brought no new bytes. This goes through
   huggingface_hub's public hook for its HTTP client, ``set_client_factory``: the client is built as
   its default one, with a ``send`` that sets the waits and counts the failures of a qwen-lab
   download (any other request passes untouched). Files that hf_xet fetches (Xet-backed repos)
   travel outside it, under hf_xet's own timeouts and retries.
2. **Quiet retries.** The warnings those retries log are dropped; the caller says once what failed.
3. **Checked bytes.** The cache names each blob after the file's ETag, which the Hub defines as the
   sha256 of the content for LFS files (``X-Linked-Etag``) and as the git blob hash (sha1 of
   ``b"blob <size>\\0"`` + content) for the others. A blob whose bytes do not hash to its name is
   removed, with the snapshot link to it, so it never counts as downloaded. Hashing reads the file
   once, in 8 MiB pieces: about 1 s per GB measured on a 2-core machine with SHA instructions
   (3 s for Qwen2.5-1.5B's 3.1 GB), more where the file is no longer in the page cache.

And the names that reach huggingface_hub or the disk are checked first: a repo id, a revision
(it becomes ``refs/<revision>`` in the cache), a file name from a shard index.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

#: A file is given up after this many failed tries in a row that brought no new bytes.
MAX_TRIES = 3
#: Answers worth retrying: the server is busy or broken, maybe for a moment.
RETRIED_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
#: huggingface_hub's loggers that report each retry (the caller reports the outcome once).
RETRY_LOGGERS = ("huggingface_hub.utils._http", "huggingface_hub.file_download")

_SHA256 = re.compile(r"[0-9a-f]{64}")
_GIT_SHA1 = re.compile(r"[0-9a-f]{40}")
_CHUNK = 8 * 2**20


class GaveUp(Exception):
    """A file's transfer failed ``MAX_TRIES`` times in a row without progress."""

    def __init__(self, problem: str, tries: int, answered: bool, received: int, total: int | None):
        super().__init__(problem)
        self.problem, self.tries, self.answered, self.received, self.total = problem, tries, answered, received, total


class Corrupt(Exception):
    """A file's bytes are not the ones the Hub named; it was removed from the cache.

    ``fresh``: it was downloaded just now (else it was found so in the cache).
    """

    def __init__(self, problem: str, fresh: bool = True):
        super().__init__(problem)
        self.fresh = fresh


@dataclass
class _Watch:
    """The tries of one file's download: its bounded waits and its failures."""

    head_timeout: float
    get_timeout: float
    tries: int = 0                       # failed tries in a row
    received: int = 0                    # furthest byte of the file received
    received_at_last_failure: int = 0
    answered: bool = False               # the server sent at least one HTTP answer
    total: int | None = None             # the file's size, once a GET announced it

    def bound(self, request) -> float:
        """Make every wait of ``request`` (connect, read, write, pool) this file's timeout, whatever was asked."""
        wait = self.head_timeout if request.method == "HEAD" else self.get_timeout
        request.extensions["timeout"] = dict.fromkeys(("connect", "read", "write", "pool"), wait)
        return wait

    def failed(self, problem: str) -> None:
        """Count a failed try; give up at ``MAX_TRIES`` in a row (a try that brought new bytes resets the count)."""
        progressed = self.received > self.received_at_last_failure
        self.received_at_last_failure = self.received
        self.tries = 1 if progressed else self.tries + 1
        if self.tries >= MAX_TRIES:
            raise GaveUp(problem, self.tries, self.answered, self.received, self.total)


_WATCH: ContextVar[_Watch | None] = ContextVar("qwen_lab_download_watch", default=None)
_client_installed = False


@contextlib.contextmanager
def watched(timeout: float | None):
    """Bounded waits and quiet retries for the huggingface_hub calls made inside the block."""
    from huggingface_hub import constants
    _install_patient_client()
    watch = _Watch(head_timeout=timeout or constants.HF_HUB_ETAG_TIMEOUT,
                   get_timeout=timeout or constants.HF_HUB_DOWNLOAD_TIMEOUT)
    token = _WATCH.set(watch)
    loggers = [logging.getLogger(name) for name in RETRY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        if lg.getEffectiveLevel() >= logging.WARNING:  # a verbosity someone asked for (INFO, DEBUG) stays
            lg.setLevel(logging.ERROR)
    try:
        yield watch
    finally:
        _WATCH.reset(token)
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _install_patient_client() -> None:
    """Have huggingface_hub build its HTTP client from ``PatientClient`` (once, and only over its default).

    A factory someone else set (for a proxy, certificates...) is left alone: its waits are then its own.
    """
    global _client_installed
    if _client_installed:
        return
    _client_installed = True
    from huggingface_hub.utils import _http, set_client_factory
    httpx = getattr(_http, "httpx2", None) or getattr(_http, "httpx", None)  # hf 2.x: httpx2; 1.x: httpx
    default = getattr(_http, "default_client_factory", None)
    if httpx is None or default is None or getattr(_http, "_GLOBAL_CLIENT_FACTORY", None) is not default:
        return
    patient = _patient_client_class(httpx)

    def factory():
        base = default()  # huggingface_hub's own settings (its request hook: offline mode, request ids...)
        client = patient(event_hooks=base.event_hooks, follow_redirects=base.follow_redirects, timeout=base.timeout)
        base.close()
        return client

    set_client_factory(factory)


def _patient_client_class(httpx):
    """An ``httpx.Client`` whose ``send`` bounds the waits and counts the failures of a watched download."""

    class WatchedStream(httpx.SyncByteStream):
        def __init__(self, inner, watch: _Watch, start: int):
            self.inner, self.watch, self.start = inner, watch, start

        def __iter__(self):
            offset = self.start
            try:
                for chunk in self.inner:
                    offset += len(chunk)
                    self.watch.received = max(self.watch.received, offset)
                    yield chunk
            except httpx.TransportError as e:
                self.watch.failed(_describe(e, self.watch.get_timeout, body=True))
                raise

        def close(self):
            self.inner.close()

    class PatientClient(httpx.Client):
        def send(self, request, **kwargs):
            watch = _WATCH.get()
            if watch is None:  # not a qwen-lab download: exactly huggingface_hub's behaviour
                return super().send(request, **kwargs)
            wait = watch.bound(request)
            try:
                response = super().send(request, **kwargs)
            except httpx.TransportError as e:
                watch.failed(_describe(e, wait, body=False))
                raise
            watch.answered = True
            if response.status_code in RETRIED_STATUSES:
                try:
                    watch.failed(f"it answered HTTP {response.status_code}")
                except GaveUp:
                    response.close()
                    raise
            elif request.method == "GET" and response.is_success and kwargs.get("stream"):
                start, total = _range_of(response)
                watch.total = total
                response.stream = WatchedStream(response.stream, watch, start)
            return response

    return PatientClient


def _range_of(response) -> tuple[int, int | None]:
    """(first byte, file size) of a GET answer: ``Content-Range: bytes 100-199/200`` for a resumed one."""
    content_range = re.fullmatch(r"bytes (\d+)-\d+/(\d+)", response.headers.get("Content-Range", "").strip())
    if response.status_code == 206 and content_range:
        return int(content_range[1]), int(content_range[2])
    length = response.headers.get("Content-Length", "")
    return 0, int(length) if length.isdigit() else None


def _describe(error: Exception, wait: float, body: bool) -> str:
    """What went wrong, in a few words, for a one-line message."""
    name = type(error).__name__
    if body:
        if "Timeout" in name:
            return f"the transfer stalled, no bytes for {wait:g} s"
        return "the connection was cut mid-transfer"
    if name == "ConnectTimeout":
        return f"no connection within {wait:g} s"
    if "Timeout" in name:
        return f"no answer within {wait:g} s"
    if name == "RemoteProtocolError":
        return "the server closed the connection without a full answer"
    first_line = (str(error).strip().splitlines() or [name])[0]
    return f"{first_line[:200]}"


# -- checked bytes --------------------------------------------------------------------------------

def blob_of(pointer: Path) -> Path | None:
    """The blob a snapshot file links to (``../../blobs/<etag>``), or None when it is not a link.

    Read one link only: a blob may itself link on into huggingface_hub's shared store, under another name.
    """
    if not pointer.is_symlink():
        return None  # no symlinks (Windows without developer mode): huggingface_hub's size check only
    return Path(os.path.normpath(pointer.parent / os.readlink(pointer)))


def blob_names(storage: Path) -> set[str]:
    """The blobs a repo's cache folder holds now."""
    try:
        return set(os.listdir(storage / "blobs"))
    except OSError:
        return set()


def check_blob(blob: Path) -> str | None:
    """Why ``blob``'s bytes are not the ones its name (the ETag) promises, or None if they are.

    None too when the name is no hash (nothing to compare with): then the size check huggingface_hub
    makes while downloading is all there is.
    """
    name = blob.name
    if _SHA256.fullmatch(name):
        kind, digest = "sha256", hashlib.sha256()
    elif _GIT_SHA1.fullmatch(name):
        kind, digest = "git blob hash", hashlib.sha1()
    else:
        return None
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(blob, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if kind == "git blob hash":
            digest.update(b"blob %d\0" % size)
        while n := f.readinto(buffer):
            digest.update(view[:n])
    actual = digest.hexdigest()
    if actual == name:
        return None
    return f"its {size:,} bytes have the {kind} {actual[:12]}…, not the Hub's {name[:12]}…"


def remove_from_cache(pointer: Path, blob: Path | None) -> None:
    """Remove a snapshot file and its blob, so that the next download fetches it afresh."""
    pointer.unlink(missing_ok=True)
    if blob is not None:
        blob.unlink(missing_ok=True)


# -- checked names --------------------------------------------------------------------------------

_REPO_ID = re.compile(r"\w(?:[\w.-]{0,94}\w)?/\w(?:[\w.-]{0,94}\w)?")


def is_repo_id(name: str) -> bool:
    """``owner/name`` as the Hub spells them (its own rules: no ``--`` or ``..``, not ending in ``.git``)."""
    return bool(_REPO_ID.fullmatch(name)) and "--" not in name and ".." not in name and not name.endswith(".git")


def is_plain_relative(name: str) -> bool:
    """A relative path of ordinary names: no ``/`` at the start, no ``.`` or ``..`` part, no ``\\``, ``:`` or
    control characters."""
    return (bool(name) and not any(c in "\\:" or ord(c) < 32 or ord(c) == 127 for c in name)
            and all(part not in ("", ".", "..") for part in name.split("/")))


def revision_problem(revision) -> str | None:
    """Why ``revision`` is not a branch, tag or commit name (git's rules, ``git check-ref-format``), or None."""
    if not isinstance(revision, str) or not revision:
        return "it is empty"
    if len(revision) > 255:
        return "it is over 255 characters"
    odd = next((c for c in revision if ord(c) < 32 or ord(c) == 127 or c in " ~^:?*[\\"), None)
    if odd is not None:
        return f"it contains {odd!r}"
    if "@{" in revision or revision == "@":
        return "it contains '@{'"
    parts = revision.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return "it has an empty, '.' or '..' part"
    if any(part.startswith(".") or part.endswith((".", ".lock")) for part in parts):
        return "a part starts or ends with '.', or ends with '.lock'"
    return None
