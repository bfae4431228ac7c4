"""A local HTTP server that speaks the Hub's file protocol, for offline tests and the download notebook.

huggingface_hub fetches ``{endpoint}/{repo_id}/resolve/{revision}/{filename}``:
a ``HEAD`` first (the commit in ``X-Repo-Commit``, the ``ETag`` naming the
blob in the cache, the size), then a ``GET`` of the bytes (from an offset, with
``Range``, when it resumes). Errors come as a status plus an ``X-Error-Code``
header (``RepoNotFound``, ``EntryNotFound``, ``RevisionNotFound``,
``GatedRepo``). Point ``HF_ENDPOINT`` (or the ``endpoint=`` argument) at this
server and the real client code runs.

The hashes are the Hub's: a plain file's ``ETag`` is its git blob hash (sha1 of
``b"blob <size>\\0"`` + content); an LFS file (weights, anything over 10 MB)
has its sha256 in ``X-Linked-Etag`` and its size in ``X-Linked-Size``, which
huggingface_hub prefers to ``ETag`` and ``Content-Length``. (The real Hub
answers an LFS file's ``HEAD`` with a redirect to its CDN; this server answers
directly, with the same headers.)

Faults, for tests: ``hub.inject(kind, file, times=...)`` makes the server
misbehave the way networks and servers do; see ``FAULTS``.

>>> # with LocalHub({"me/tiny": "path/to/dir"}) as hub: resolve("me/tiny", endpoint=hub.url)
"""
from __future__ import annotations

import fnmatch
import hashlib
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

#: What ``inject`` can make the server do, and to which requests.
FAULTS = {
    "truncate": "GET: announce the whole body, send it up to `at`, then close the connection",
    "stall": "GET: send the body up to `at`, then nothing more, the connection left open",
    "short": "HEAD and GET: serve the file cut at `at`, sizes to match, under the whole file's ETag",
    "garbage": "GET: as many bytes as the file holds, but other bytes, under its ETag",
    "hang_head": "HEAD: never answer",
    "error_500": "HEAD and GET: answer HTTP 500",
}

#: Files the Hub keeps in LFS: these suffixes (its default .gitattributes), and anything over 10 MB.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".onnx", ".msgpack", ".h5", ".model",
                ".npz", ".zip", ".tar", ".gz")
LFS_MIN_SIZE = 10 * 2**20


@dataclass
class Fault:
    """One injected fault: ``kind`` (a key of ``FAULTS``) for the files matching ``file`` (a glob).

    ``times`` is how many requests it spoils (``None``: all of them); ``at`` is where in the
    file a truncate, stall or short cuts it (a fraction of its size).
    """

    kind: str
    file: str = "*"
    times: int | None = None
    at: float = 0.5

    def applies(self, method: str, filename: str) -> bool:
        methods = {"hang_head": ("HEAD",), "short": ("HEAD", "GET"), "error_500": ("HEAD", "GET")}
        return (method in methods.get(self.kind, ("GET",)) and fnmatch.fnmatchcase(filename, self.file)
                and (self.times is None or self.times > 0))


def git_blob_hash(data: bytes) -> str:
    """The id git gives a file's content: sha1 of ``b"blob <size>\\0"`` + content (``git hash-object``)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class LocalHub:
    """Serve ``{repo_id: directory}`` on 127.0.0.1; ``gated`` repos answer 403 GatedRepo.

    Every repo answers ``main`` and its commit (``commit(repo_id)``), plus any name in
    ``revisions``. ``requests`` records each ``(method, path, status)`` served (status 0: a
    request never answered); ``faults`` records each ``(method, path, kind)`` spoiled.
    """

    def __init__(self, repos: dict[str, str | Path], gated: tuple[str, ...] = (),
                 revisions: tuple[str, ...] = ()) -> None:
        self.repos = {k: Path(v) for k, v in repos.items()}
        self.gated = set(gated)
        self.revisions = set(revisions)
        self.requests: list[tuple[str, str, int]] = []
        self.faults: list[tuple[str, str, str]] = []
        self._injected: list[Fault] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self):
                hub._answer(self)

            def do_GET(self):
                hub._answer(self)

            def log_message(self, *args):  # keep test and notebook output clean
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True  # a stalled answer must not hold up stop()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def commit(self, repo_id: str) -> str:
        """The (made-up, stable) commit hash of a repo's ``main``."""
        return hashlib.sha1(repo_id.encode()).hexdigest()

    def inject(self, kind: str, file: str = "*", *, times: int | None = None, at: float = 0.5) -> Fault:
        """Make the server misbehave for ``file`` (a glob); see ``FAULTS``. ``times=None``: until cleared."""
        if kind not in FAULTS:
            raise ValueError(f"unknown fault {kind!r}: one of {', '.join(FAULTS)}")
        fault = Fault(kind, file, times, at)
        with self._lock:
            self._injected.append(fault)
        return fault

    def clear_faults(self) -> None:
        """Back to a well-behaved server."""
        with self._lock:
            self._injected.clear()

    def _fault_for(self, method: str, path: str, filename: str) -> Fault | None:
        with self._lock:
            fault = next((f for f in self._injected if f.applies(method, filename)), None)
            if fault is not None:
                if fault.times is not None and not (fault.kind == "short" and method == "HEAD"):
                    fault.times -= 1  # a short file's HEAD only describes it; its GET is the spoiled request
                self.faults.append((method, path, fault.kind))
        return fault

    def _answer(self, handler: BaseHTTPRequestHandler) -> None:
        method, path = handler.command, handler.path
        status, headers, data, filename = self._route(path)
        fault = self._fault_for(method, path, filename) if status == 200 else None
        kind = fault.kind if fault else None
        if kind == "hang_head":
            self.requests.append((method, path, 0))
            self._stopping.wait(600)  # until stop(); the client's timeout is what ends this
            return
        if kind == "error_500":
            status, headers, data = 500, {"X-Error-Message": "Internal Error (injected)"}, b"Internal Error"
        cut = int(len(data) * fault.at) if fault else len(data)
        if kind == "short":
            data = data[:cut]
            if "X-Linked-Size" in headers:
                headers["X-Linked-Size"] = str(len(data))
        elif kind == "garbage":
            data = data.translate(bytes(range(255, -1, -1)))  # every byte b becomes 255 - b
        start = 0
        if status == 200 and method == "GET":
            start = _range_start(handler.headers.get("Range"), len(data))
            if start:
                status = 206
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        self.requests.append((method, path, status))
        handler.send_response(status)
        for k, v in headers.items():
            handler.send_header(k, v)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if method != "GET":
            return
        if kind in ("truncate", "stall"):
            handler.wfile.write(data[start:max(start, cut)])
            handler.wfile.flush()
            if kind == "stall":
                self._stopping.wait(600)  # until stop(); the client's read timeout is what ends this
            handler.close_connection = True
            return
        handler.wfile.write(body)

    def _route(self, path: str) -> tuple[int, dict, bytes, str]:
        # The revision is one URL segment (huggingface_hub quotes its "/"), the filename the rest.
        parts = path.split("?")[0].strip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            return 404, {"X-Error-Code": "RepoNotFound"}, b"not found", ""
        repo_id, revision = unquote("/".join(parts[:2])), unquote(parts[3])
        filename = unquote("/".join(parts[4:]))
        if repo_id not in self.repos:
            return 401, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}, b"", filename
        if repo_id in self.gated:
            return 403, {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access to this repo is restricted"}, b"", \
                filename
        commit = self.commit(repo_id)
        if revision not in ("main", commit, *self.revisions):
            return 404, {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"}, b"", filename
        file = self.repos[repo_id] / filename
        if ".." in filename.split("/") or not file.is_file():
            return 404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit,
                         "X-Error-Message": "Entry not found"}, b"", filename
        data = file.read_bytes()
        headers = {"X-Repo-Commit": commit, "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
        if filename.endswith(LFS_SUFFIXES) or len(data) > LFS_MIN_SIZE:
            sha256 = hashlib.sha256(data).hexdigest()
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n"
            headers.update({"ETag": f'"{git_blob_hash(pointer.encode())}"', "X-Linked-Etag": f'"{sha256}"',
                            "X-Linked-Size": str(len(data))})
        else:
            headers["ETag"] = f'"{git_blob_hash(data)}"'
        return 200, headers, data, filename

    def __enter__(self) -> "LocalHub":
        self._thread.start()
        return self

    def start(self) -> "LocalHub":
        return self.__enter__()

    def __exit__(self, *exc) -> None:
        self._stopping.set()  # releases stalled and hanging answers
        self._server.shutdown()
        self._server.server_close()

    def stop(self) -> None:
        self.__exit__()


def _range_start(header: str | None, size: int) -> int:
    """The first byte a ``Range: bytes=N-`` header asks for (0 when absent, or not a range this server serves)."""
    match = re.fullmatch(r"bytes=(\d+)-", (header or "").strip())
    return int(match[1]) if match and int(match[1]) < size else 0
