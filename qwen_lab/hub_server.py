"""A local HTTP server that speaks the Hub's file protocol, for offline tests and the download notebook.

huggingface_hub fetches ``{endpoint}/{repo_id}/resolve/{revision}/{filename}``:
a ``HEAD`` first (the commit in ``X-Repo-Commit``, the ``ETag`` naming the
blob in the cache, the size), then a ``GET`` of the bytes. Errors come as a
status plus an ``X-Error-Code`` header (``RepoNotFound``, ``EntryNotFound``,
``RevisionNotFound``, ``GatedRepo``). Point ``HF_ENDPOINT`` (or the
``endpoint=`` argument) at this server and the real client code runs.

>>> # with LocalHub({"me/tiny": "path/to/dir"}) as hub: resolve("me/tiny", endpoint=hub.url)
"""
from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote


class LocalHub:
    """Serve ``{repo_id: directory}`` on 127.0.0.1; ``gated`` repos answer 403 GatedRepo.

    ``requests`` records each ``(method, path, status)`` served.
    """

    def __init__(self, repos: dict[str, str | Path], gated: tuple[str, ...] = ()) -> None:
        self.repos = {k: Path(v) for k, v in repos.items()}
        self.gated = set(gated)
        self.requests: list[tuple[str, str, int]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self):
                hub._answer(self, body=False)

            def do_GET(self):
                hub._answer(self, body=True)

            def log_message(self, *args):  # keep test and notebook output clean
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def commit(self, repo_id: str) -> str:
        """The (made-up, stable) commit hash of a repo's ``main``."""
        return hashlib.sha1(repo_id.encode()).hexdigest()

    def _answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        status, headers, data = self._route(unquote(handler.path.split("?")[0]))
        self.requests.append((handler.command, handler.path, status))
        handler.send_response(status)
        for k, v in headers.items():
            handler.send_header(k, v)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if body:
            handler.wfile.write(data)

    def _route(self, path: str) -> tuple[int, dict, bytes]:
        parts = path.strip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            return 404, {"X-Error-Code": "RepoNotFound"}, b"not found"
        repo_id, revision, filename = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        if repo_id not in self.repos:
            return 401, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}, b""
        if repo_id in self.gated:
            return 403, {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access to this repo is restricted"}, b""
        commit = self.commit(repo_id)
        if revision not in ("main", commit):
            return 404, {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"}, b""
        file = self.repos[repo_id] / filename
        if ".." in parts or not file.is_file():
            return 404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit,
                         "X-Error-Message": "Entry not found"}, b""
        data = file.read_bytes()
        return 200, {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                     "Content-Type": "application/octet-stream"}, data

    def __enter__(self) -> "LocalHub":
        self._thread.start()
        return self

    def start(self) -> "LocalHub":
        return self.__enter__()

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def stop(self) -> None:
        self.__exit__()
