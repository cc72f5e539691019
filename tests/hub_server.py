"""A minimal in-memory Hugging Face Hub, just enough of its HTTP API for the real ``huggingface_hub`` client.

Tests push and pull through the genuine client code paths (create_repo, upload_folder / create_commit,
hf_hub_download, file_exists, repo_info, ModelCard.load) without any network beyond 127.0.0.1. Only what those calls
use is implemented, following huggingface_hub 2.x (hf_api.py, _commit_api.py, file_download.py, utils/_http.py):

- ``POST /api/repos/create``                                     create a model / dataset / space repo (409 if taken)
- ``POST /api/validate-yaml``                                     README metadata check (always fine)
- ``POST /api/{type}s/{repo_id}/preupload/{rev}``                 every file gets upload mode "regular"
- ``POST /api/{type}s/{repo_id}/commit/{rev}``                    NDJSON: header + base64 ``file`` / deletions
- ``GET  /api/{type}s/{repo_id}[/revision/{rev}]``               repo info with its file list (``siblings``)
- ``GET  /api/{type}s/{repo_id}/tree/{rev}[/{path}]``            flat file listing
- ``GET|HEAD /[{type}s/]{repo_id}/resolve/{rev}/{path}``          file bytes with X-Repo-Commit, ETag, Content-Length

Errors carry the ``X-Error-Code`` header (RepoNotFound, RevisionNotFound, EntryNotFound) that the client maps to its
exception classes. Private repos answer RepoNotFound to anyone but their creator's token, as the Hub does. No LFS or
Xet storage: the preupload answer keeps every file inline in the commit, which is fine for test-sized files.

The server runs in a daemon thread on an ephemeral port and shuts itself down after ``lifetime_s`` even if a test
forgets to stop it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

REPO_TYPES = ("model", "dataset", "space")
_TYPE_GROUP = r"(?P<type>models|datasets|spaces)"
_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    ("POST", re.compile(r"^/api/repos/create$"), "create_repo"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
    ("POST", re.compile(rf"^/api/{_TYPE_GROUP}/(?P<repo>.+?)/preupload/(?P<rev>[^/]+)$"), "preupload"),
    ("POST", re.compile(rf"^/api/{_TYPE_GROUP}/(?P<repo>.+?)/commit/(?P<rev>[^/]+)$"), "commit"),
    ("GET", re.compile(rf"^/api/{_TYPE_GROUP}/(?P<repo>.+?)/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$"), "tree"),
    ("GET", re.compile(rf"^/api/{_TYPE_GROUP}/(?P<repo>[^/]+(?:/[^/]+)?)(?:/revision/(?P<rev>[^/]+))?$"), "info"),
    ("GET", re.compile(r"^/(?:(?P<type>datasets|spaces)/)?(?P<repo>.+?)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "file"),
    (
        "HEAD",
        re.compile(r"^/(?:(?P<type>datasets|spaces)/)?(?P<repo>.+?)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"),
        "file",
    ),
]


@dataclass
class Commit:
    oid: str
    message: str
    files: dict[str, bytes]


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool = False
    owner_token: str | None = None  # None: any token may write (repos seeded by a test)
    commits: list[Commit] = field(default_factory=list)

    @property
    def head(self) -> Commit:
        return self.commits[-1]

    def at(self, revision: str) -> Commit | None:
        """``main`` (the only branch) or a full commit id."""
        if revision == "main":
            return self.head
        return next((c for c in self.commits if c.oid == revision), None)


class HubError(Exception):
    """An HTTP error answer, with the headers the huggingface_hub client reads."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class HubServer:
    """In-memory Hub on ``http://127.0.0.1:<port>``; use as a context manager or call ``start`` / ``stop``."""

    def __init__(self, lifetime_s: float = 120.0) -> None:
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, for assertions
        self.auth_headers: list[str] = []  # Authorization values seen, to check that tokens are sent
        self._lock = threading.Lock()
        self._stop_lock = threading.Lock()
        self._lifetime_s = lifetime_s
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._timer: threading.Timer | None = None

    # --- lifecycle -----------------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        httpd.daemon_threads = True
        httpd.hub = self  # type: ignore[attr-defined]
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        self._timer = threading.Timer(self._lifetime_s, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        """Idempotent; called by the fixture's teardown, or by the lifetime timer if nobody did."""
        with self._stop_lock:
            if self._timer is not None and self._timer is not threading.current_thread():
                self._timer.cancel()
            if self._httpd is not None:
                self._httpd.shutdown()
                self._httpd.server_close()
                self._httpd = None  # only now: ``stopped`` means the port is closed
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    @property
    def stopped(self) -> bool:
        return self._httpd is None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- test helpers --------------------------------------------------------------------------------------------

    def create_repo(
        self, repo_id: str, repo_type: str = "model", *, private: bool = False, files: dict[str, bytes] | None = None
    ) -> Repo:
        """Seed a repository directly (no client involved), optionally with a first commit of ``files``."""
        with self._lock:
            repo = Repo(repo_type, repo_id, private=private)
            _append_commit(repo, {}, "initial commit")
            self.repos[(repo_type, repo_id)] = repo
        if files:
            self.commit(repo_id, files, repo_type=repo_type)
        return repo

    def commit(self, repo_id: str, files: dict[str, bytes], *, repo_type: str = "model", message: str = "") -> str:
        with self._lock:
            repo = self.repos[(repo_type, repo_id)]
            return _append_commit(repo, {**repo.head.files, **files}, message or "add files")

    def files(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> dict[str, bytes]:
        commit = self.repos[(repo_type, repo_id)].at(revision)
        assert commit is not None, f"no revision {revision}"
        return dict(commit.files)

    def corrupt(
        self,
        repo_id: str,
        path: str,
        *,
        repo_type: str = "model",
        truncate_to: int | None = None,
        flip_at: int | None = None,
    ) -> None:
        """Damage a stored file in place (same commit id, as a bad disk or a broken mirror would).

        ``truncate_to`` cuts it to that many bytes; ``flip_at`` inverts the byte at that offset (negative counts from
        the end); with neither, the last byte is flipped.
        """
        with self._lock:
            files = self.repos[(repo_type, repo_id)].head.files
            data = bytearray(files[path])
            if truncate_to is not None:
                del data[truncate_to:]
            else:
                index = -1 if flip_at is None else flip_at
                data[index] ^= 0xFF
            files[path] = bytes(data)

    # --- request handling (called from the handler threads) ------------------------------------------------------

    def handle(
        self, method: str, raw_path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        path = urlsplit(raw_path).path
        auth = headers.get("authorization", "")
        token = auth[len("Bearer ") :] if auth.startswith("Bearer ") else None
        with self._lock:
            self.requests.append((method, path))
            if auth:
                self.auth_headers.append(auth)
        for route_method, pattern, name in _ROUTES:
            match = pattern.match(path)
            if route_method == method and match:
                args = {k: unquote(v) if v is not None else None for k, v in match.groupdict().items()}
                if "type" in args:
                    args["type"] = (args["type"] or "models")[:-1]
                try:
                    with self._lock:
                        return getattr(self, f"_{name}")(args, token, body, method)
                except HubError as err:
                    error_headers = {"X-Error-Message": err.message}
                    if err.code:
                        error_headers["X-Error-Code"] = err.code
                    return _json(err.status, {"error": err.message}, error_headers)
        return _json(404, {"error": f"Not Found: {method} {path}"})

    def _repo(self, args: dict[str, Any], token: str | None, *, write: bool = False) -> Repo:
        repo = self.repos.get((args["type"], args["repo"]))
        if repo is None or (repo.private and (token is None or token != repo.owner_token)):
            raise HubError(404, "Repository not found", "RepoNotFound")
        if write:
            if token is None:
                raise HubError(401, "Invalid credentials in Authorization header")
            if repo.owner_token is not None and token != repo.owner_token:
                raise HubError(403, "You don't have the rights to write to this repository")
        return repo

    def _revision(self, repo: Repo, revision: str | None) -> Commit:
        commit = repo.at(revision or "main")
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def _prefix(self, repo: Repo) -> str:
        return "" if repo.repo_type == "model" else f"{repo.repo_type}s/"

    def _create_repo(self, args: dict, token: str | None, body: bytes, method: str) -> tuple:
        if token is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        payload = json.loads(body)
        repo_type = payload.get("type") or "model"
        if repo_type not in REPO_TYPES:
            raise HubError(400, f"invalid repo type {repo_type!r}")
        name, organization = payload["name"], payload.get("organization")
        repo_id = f"{organization}/{name}" if organization else name
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        repo = self.repos.get((repo_type, repo_id))
        if repo is not None:
            return _json(409, {"error": f"You already created this {repo_type} repo", "url": self._url(repo)})
        repo = Repo(repo_type, repo_id, private=private, owner_token=token)
        _append_commit(repo, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}, "initial")
        self.repos[(repo_type, repo_id)] = repo
        return _json(200, {"url": self._url(repo), "name": repo_id})

    def _url(self, repo: Repo) -> str:
        return f"{self.url}/{self._prefix(repo)}{repo.repo_id}"

    def _validate_yaml(self, args: dict, token: str | None, body: bytes, method: str) -> tuple:
        return _json(200, {"errors": [], "warnings": []})

    def _preupload(self, args: dict, token: str | None, body: bytes, method: str) -> tuple:
        repo = self._repo(args, token, write=True)
        self._revision(repo, args["rev"])
        files = [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
            for f in json.loads(body)["files"]
        ]
        return _json(200, {"files": files, "commitOid": repo.head.oid})

    def _commit(self, args: dict, token: str | None, body: bytes, method: str) -> tuple:
        repo = self._repo(args, token, write=True)
        if args["rev"] != "main":
            raise HubError(404, f"Invalid rev id: {args['rev']} (this test server has only 'main')", "RevisionNotFound")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "the commit payload must start with a header line")
        header = lines[0]["value"]
        parent = header.get("parentCommit")
        if parent is not None and parent != repo.head.oid:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(repo.head.files)
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            target = _safe_path(value.get("path", ""))
            if key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, "only base64 file content is supported")
                files[target] = base64.b64decode(value["content"], validate=True)
            elif key == "deletedFile":
                files.pop(target, None)
            elif key == "deletedFolder":
                prefix = target.rstrip("/") + "/"
                files = {p: data for p, data in files.items() if not p.startswith(prefix)}
            else:
                raise HubError(400, f"unsupported commit operation {key!r} (no LFS / Xet storage on this server)")
        oid = _append_commit(repo, files, header.get("summary", ""))
        url = f"{self._url(repo)}/commit/{oid}"
        return _json(200, {"success": True, "commitOid": oid, "commitUrl": url, "pullRequestUrl": None})

    def _info(self, args: dict, token: str | None, body: bytes, method: str) -> tuple:
        repo = self._repo(args, token)
        commit = self._revision(repo, args.get("rev"))
        return _json(
            200,
            {
                "id": repo.repo_id,
                "sha": commit.oid,
                "private": repo.private,
                "siblings": [{"rfilename": path} for path in sorted(commit.files)],
            },
        )

    def _tree(self, args: dict, token: str | None, body: bytes, method: str) -> tuple:
        repo = self._repo(args, token)
        commit = self._revision(repo, args["rev"])
        prefix = (args.get("path") or "").strip("/")
        entries = [
            {"type": "file", "oid": _git_blob_oid(data), "size": len(data), "path": path}
            for path, data in sorted(commit.files.items())
            if not prefix or path.startswith(prefix + "/")
        ]
        return _json(200, entries)

    def _file(self, args: dict, token: str | None, body: bytes, method: str) -> tuple:
        repo = self._repo(args, token)
        commit = self._revision(repo, args["rev"])
        data = commit.files.get(args["path"])
        if data is None:
            return _json(
                404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit.oid}
            )
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
            "X-Repo-Commit": commit.oid,
        }
        return 200, headers, data


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client expects; every answer carries Content-Length

    def _dispatch(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {key.lower(): value for key, value in self.headers.items()}
        hub: HubServer = self.server.hub  # type: ignore[attr-defined]
        try:
            status, out_headers, payload = hub.handle(self.command, self.path, headers, body)
        except Exception as exc:  # a bug in this server: answer 500 rather than hanging the client
            status, out_headers, payload = _json(500, {"error": f"{type(exc).__name__}: {exc}"})
        self.send_response(status)
        for key, value in out_headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_HEAD = do_POST = _dispatch

    def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read server.requests instead
        pass


def _json(status: int, payload: Any, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(payload).encode()


def _safe_path(path: str) -> str:
    parts = path.split("/")
    if not path or path.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise HubError(400, f"invalid path in repo: {path!r}")
    return path


def _git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _commit_oid(parent: str, files: dict[str, bytes], message: str) -> str:
    digest = hashlib.sha1(parent.encode() + b"\0" + message.encode())
    for path in sorted(files):
        digest.update(path.encode() + b"\0" + _git_blob_oid(files[path]).encode())
    return digest.hexdigest()


def _append_commit(repo: Repo, files: dict[str, bytes], message: str) -> str:
    parent = repo.commits[-1].oid if repo.commits else ""
    oid = _commit_oid(f"{parent}:{len(repo.commits)}", files, message)
    repo.commits.append(Commit(oid, message, files))
    return oid
