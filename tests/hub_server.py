"""A loopback stand-in for the Hugging Face Hub, for tests that push and pull without the internet.

It speaks the part of the Hub HTTP API that `huggingface_hub` and `transformers` use to create a repo, commit
files (plain base64 NDJSON commits: every file is answered "regular", so no LFS or Xet upload is ever attempted),
and download them again:

    GET  /api/whoami-v2
    POST /api/repos/create                         409 when the repo exists
    POST /api/validate-yaml
    POST /api/{type}s/{repo}/preupload/{rev}
    POST /api/{type}s/{repo}/commit/{rev}          NDJSON: header, file (base64), deletedFile, deletedFolder
    GET  /api/{type}s/{repo}[/revision/{rev}]      repo info with siblings
    GET  /api/{type}s/{repo}/tree/{rev}[/{path}]   listing (404 EntryNotFound for a missing folder)
    HEAD/GET /[{type}s/]{repo}/resolve/{rev}/{path} X-Repo-Commit, ETag (git blob sha1), 404 X-Error-Code

Repos live in memory; every commit gets its own sha and keeps a snapshot, so `{rev}` may be a branch name (only
`main`) or a commit sha. `fail_next(operation, status)` makes the next request of one kind fail, for error tests.
Standard library only; bound to 127.0.0.1 on a free port.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

USER = "user"
REPO_TYPES = ("model", "dataset", "space")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    sha: str
    message: str
    files: dict[str, bytes]


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool
    commits: list[Commit] = field(default_factory=list)

    def snapshot(self, revision: str) -> Commit | None:
        if revision == "main":
            return self.commits[-1]
        return next((c for c in self.commits if c.sha == revision), None)


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


@dataclass
class _Fault:
    operation: str
    status: int
    message: str


class HubServer:
    """The server and its repos. Use as a context manager, or call `start()` / `stop()`."""

    # The operation names `fail_next` accepts.
    OPERATIONS = ("whoami", "create", "validate-yaml", "preupload", "commit", "info", "tree", "resolve")

    def __init__(self):
        self.repos: dict[tuple[str, str], Repo] = {}
        self.log: list[tuple[str, str, int]] = []  # (method, path, status) of every request
        self._faults: list[_Fault] = []
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        # Set by the `hub` fixture (hub_fixtures.py): the client settings as environment variables, and HF_HOME.
        self.env: dict[str, str] = {}
        self.home = None

    # ----- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> HubServer:
        hub = self

        class Handler(_Handler):
            server_state = hub

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self):
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join()
            self._httpd = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    # ----- test helpers ------------------------------------------------------------------------------------------
    def fail_next(self, operation: str, status: int = 500, message: str = "Internal Server Error (injected)"):
        """Make the next request of `operation` (one of OPERATIONS) answer `status` instead."""
        if operation not in self.OPERATIONS:
            raise ValueError(f"unknown operation {operation!r}; one of {self.OPERATIONS}")
        with self._lock:
            self._faults.append(_Fault(operation, status, message))

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """The files of a repo at a revision (a copy)."""
        commit = self._repo(repo_type, repo_id).snapshot(revision)
        if commit is None:
            raise KeyError(revision)
        return dict(commit.files)

    def commits(self, repo_id: str, repo_type: str = "model") -> list[str]:
        """Commit shas, oldest first (the first is the repo's initial commit)."""
        return [c.sha for c in self._repo(repo_type, repo_id).commits]

    def requests(self, method: str | None = None, contains: str = "") -> list[tuple[str, str, int]]:
        return [r for r in self.log if (method is None or r[0] == method) and contains in r[1]]

    # ----- repo operations (called under the lock) ---------------------------------------------------------------
    def _repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def _create(self, body: dict) -> dict:
        repo_type = body.get("type") or "model"
        if repo_type not in REPO_TYPES:
            raise HubError(400, f"invalid repo type {repo_type!r}")
        repo_id = f"{body.get('organization') or USER}/{body['name']}"
        url = f"{self.url}/{_url_prefix(repo_type)}{repo_id}"
        if (repo_type, repo_id) in self.repos:  # the Hub names the existing repo in its 409, and the client reads it
            raise HubError(409, f"You already created this {repo_type} repo", url=url)
        private = body.get("private", body.get("visibility") == "private")
        repo = Repo(repo_id, repo_type, bool(private))
        initial = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}
        repo.commits.append(Commit(_commit_sha("", "initial commit", initial), "initial commit", initial))
        self.repos[(repo_type, repo_id)] = repo
        return {"url": url, "name": repo_id, "id": repo_id}

    def _commit(self, repo: Repo, revision: str, lines: list[dict]) -> dict:
        if revision != "main":
            raise HubError(400, f"this test server only commits to main, not {revision!r}")
        header = next((line["value"] for line in lines if line.get("key") == "header"), None)
        if header is None:
            raise HubError(400, "commit without header")
        parent = repo.commits[-1]
        if header.get("parentCommit") not in (None, parent.sha):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(parent.files)
        for line in lines:
            key, value = line.get("key"), line.get("value", {})
            if key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, f"unsupported encoding {value.get('encoding')!r}")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if value["path"] not in files:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                del files[value["path"]]
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: d for p, d in files.items() if not p.startswith(prefix)}
            elif key in ("lfsFile", "copy"):
                raise HubError(400, f"{key} is not supported by this test server (every file is 'regular')")
            elif key != "header":
                raise HubError(400, f"unknown commit operation {key!r}")
        message = header.get("summary") or "commit"
        commit = Commit(_commit_sha(parent.sha, message, files), message, files)
        repo.commits.append(commit)
        return {
            "commitOid": commit.sha,
            "commitUrl": f"{self.url}/{_url_prefix(repo.repo_type)}{repo.repo_id}/commit/{commit.sha}",
            "success": True,
            "pullRequestUrl": None,
        }

    def _info(self, repo: Repo, revision: str) -> dict:
        commit = self._snapshot(repo, revision)
        return {
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "sha": commit.sha,
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "tags": [],
            "siblings": [
                {"rfilename": path, "size": len(data), "blobId": git_blob_sha1(data)}
                for path, data in sorted(commit.files.items())
            ],
        }

    def _tree(self, repo: Repo, revision: str, folder: str, recursive: bool) -> list[dict]:
        commit = self._snapshot(repo, revision)
        prefix = folder.strip("/") + "/" if folder.strip("/") else ""
        entries: dict[str, dict] = {}
        for path, data in sorted(commit.files.items()):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            for depth in range(1, len(parts)):  # the folders on the way
                if depth > 1 and not recursive:
                    break
                sub = prefix + "/".join(parts[:depth])
                entries.setdefault(sub, {"type": "directory", "path": sub, "oid": "0" * 40, "size": 0})
            if recursive or len(parts) == 1:
                entries[path] = {"type": "file", "path": path, "oid": git_blob_sha1(data), "size": len(data)}
        if prefix and not entries:
            raise HubError(404, f"{folder} does not exist on {revision!r}", "EntryNotFound")
        return list(entries.values())

    def _snapshot(self, repo: Repo, revision: str) -> Commit:
        commit = repo.snapshot(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def _take_fault(self, operation: str) -> _Fault | None:
        for i, fault in enumerate(self._faults):
            if fault.operation == operation:
                return self._faults.pop(i)
        return None


def _commit_sha(parent: str, message: str, files: dict[str, bytes]) -> str:
    digest = hashlib.sha1(f"{parent}\n{message}\n".encode())
    for path in sorted(files):
        digest.update(f"{path} {git_blob_sha1(files[path])}\n".encode())
    return digest.hexdigest()


def _url_prefix(repo_type: str) -> str:
    return "" if repo_type == "model" else f"{repo_type}s/"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_state: HubServer

    def log_message(self, format, *args):  # quiet
        pass

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    # ----- plumbing --------------------------------------------------------------------------------------------------
    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload, headers: dict | None = None):
        self._send(status, json.dumps(payload).encode(), headers)

    def _dispatch(self, method: str):
        hub = self.server_state
        split = urlsplit(self.path)
        body = self._body() if method in ("POST", "PUT", "DELETE") else b""
        status = 500
        try:
            operation, handler = self._route(method, split.path)
            with hub._lock:
                fault = hub._take_fault(operation)
            if fault is not None:
                raise HubError(fault.status, fault.message)
            status = handler(body, parse_qs(split.query)) or 200
        except HubError as error:
            status = error.status
            headers = {"X-Error-Message": error.message}
            if error.code:
                headers["X-Error-Code"] = error.code
            self._json(error.status, {"error": error.message, **error.extra}, headers)
        except Exception as error:  # a bug in this server: report it to the client instead of hanging
            self._json(500, {"error": f"test hub server: {type(error).__name__}: {error}"})
        finally:
            with hub._lock:
                hub.log.append((method, split.path, status))

    def _route(self, method: str, path: str):
        """(operation name, handler) for a request path; raises HubError 404 for anything unknown."""
        parts = [unquote(p) for p in path.strip("/").split("/")]
        hub = self.server_state

        def repo_of(repo_type: str, namespace: str, name: str) -> Repo:
            with hub._lock:
                return hub._repo(repo_type, f"{namespace}/{name}")

        if parts[0] == "api":
            rest = parts[1:]
            if method == "GET" and rest == ["whoami-v2"]:
                return "whoami", self._whoami
            if method == "POST" and rest == ["repos", "create"]:
                return "create", self._create
            if method == "POST" and rest == ["validate-yaml"]:
                return "validate-yaml", lambda body, query: self._json(200, {"errors": [], "warnings": []})
            if len(rest) >= 3 and rest[0].rstrip("s") in REPO_TYPES:
                repo_type, namespace, name, tail = rest[0][:-1], rest[1], rest[2], rest[3:]
                if method == "POST" and len(tail) == 2 and tail[0] == "preupload":
                    return "preupload", lambda body, q: self._preupload(body)
                if method == "POST" and len(tail) == 2 and tail[0] == "commit":
                    return "commit", lambda body, q: self._commit(repo_of(repo_type, namespace, name), tail[1], body)
                if method == "GET" and (not tail or (len(tail) == 2 and tail[0] == "revision")):
                    revision = tail[1] if tail else "main"
                    return "info", lambda body, q: self._info(repo_of(repo_type, namespace, name), revision)
                if method == "GET" and len(tail) >= 2 and tail[0] == "tree":
                    return "tree", lambda body, q: self._tree(
                        repo_of(repo_type, namespace, name), tail[1], "/".join(tail[2:]), q
                    )
        elif method in ("GET", "HEAD"):
            repo_type = "model"
            if parts[0] in ("datasets", "spaces"):
                repo_type, parts = parts[0][:-1], parts[1:]
            if len(parts) >= 5 and parts[2] == "resolve":
                namespace, name, revision, filename = parts[0], parts[1], parts[3], "/".join(parts[4:])
                return "resolve", lambda body, q: self._resolve(
                    repo_of(repo_type, namespace, name), revision, filename
                )
        raise HubError(404, f"{method} {path} is not served by the test hub")

    # ----- handlers ----------------------------------------------------------------------------------------------
    def _require_token(self):
        if not self.headers.get("Authorization", "").startswith("Bearer "):
            raise HubError(401, "Invalid credentials in Authorization header")

    def _whoami(self, body, query):
        self._require_token()
        self._json(
            200,
            {
                "type": "user",
                "name": USER,
                "fullname": "Test User",
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}},
            },
        )

    def _create(self, body, query):
        self._require_token()
        hub = self.server_state
        with hub._lock:
            self._json(200, hub._create(json.loads(body)))

    def _preupload(self, body):
        self._require_token()
        files = json.loads(body)["files"]
        self._json(
            200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
        )

    def _commit(self, repo: Repo, revision: str, body: bytes):
        self._require_token()
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        hub = self.server_state
        with hub._lock:
            self._json(200, hub._commit(repo, revision, lines))

    def _info(self, repo: Repo, revision: str):
        hub = self.server_state
        with hub._lock:
            self._json(200, hub._info(repo, revision))

    def _tree(self, repo: Repo, revision: str, folder: str, query: dict):
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        hub = self.server_state
        with hub._lock:
            self._json(200, hub._tree(repo, revision, folder, recursive))

    def _resolve(self, repo: Repo, revision: str, filename: str):
        hub = self.server_state
        with hub._lock:
            commit = hub._snapshot(repo, revision)
        data = commit.files.get(filename)
        headers = {"X-Repo-Commit": commit.sha}
        if data is None:
            headers.update({"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found"})
            self._send(404, b"Entry not found", headers, content_type="text/plain")
            return 404
        headers["ETag"] = f'"{git_blob_sha1(data)}"'
        self._send(200, data, headers, content_type="application/octet-stream")
        return 200
