"""A small stand-in for the Hugging Face Hub's HTTP API, for tests of publishing.

It serves, on 127.0.0.1 and a random port, the endpoints the real ``huggingface_hub`` client calls to
publish a model: whoami, repo creation, branch creation, README metadata validation, preupload (which
files go as regular git blobs and which as LFS), the LFS batch API with basic PUT transfers and verify,
and the NDJSON commit (with ``parentCommit``: refused with 412 when the branch moved on); and what it calls
to read a repo back: the repo's info at a revision with its files (``model_info(files_metadata=True)``) and
a file's content (``/REPO/resolve/REVISION/PATH``, by branch or commit id). Every request is recorded
(method, path, headers, body) so tests can assert what the client sent. Repos live in memory:
branch -> list of commits -> {path: bytes}.

Use with ``HF_ENDPOINT`` pointing at ``server.url`` and Xet disabled (this server has no Xet storage).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import yaml

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # names in lower case
    body: bytes


@dataclass
class Commit:
    oid: str
    summary: str
    description: str
    files: dict[str, bytes]  # the whole tree after this commit
    added: list[str]
    lfs: list[str]


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, list[Commit]] = field(default_factory=dict)

    def tree(self, branch: str = "main") -> dict[str, bytes]:
        commits = self.branches.get(branch) or []
        return dict(commits[-1].files) if commits else {}

    def at(self, revision: str) -> Commit | None:
        """The commit a branch name or commit id points at."""
        if revision in self.branches:
            commits = self.branches[revision]
            return commits[-1] if commits else None
        return next((c for cs in self.branches.values() for c in cs if c.oid == revision), None)


class HubState:
    def __init__(self, token: str, user: str = "test-user") -> None:
        self.token = token
        self.user = user
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.requests: list[Request] = []
        self.lock = threading.Lock()
        self.fail_commit_with: int | None = None  # make the commit endpoint fail (tests of error paths)
        # drop the connection in the middle of every LFS upload body (a network failure mid-transfer)
        self.drop_uploads = False
        # commits someone else lands on the branch just before each of the next N commits of the client
        self.foreign_commits = 0

    def commit(self, repo: Repo, branch: str, summary: str, description: str, files: dict[str, bytes],
               lfs: list[str]) -> Commit:  # fmt: skip
        parent = repo.tree(branch)
        tree = {**parent, **files}
        oid = hashlib.sha1(json.dumps([repo.repo_id, branch, summary, sorted(tree)]).encode() + b"".join(
            tree[k] for k in sorted(tree)), usedforsecurity=False).hexdigest()  # fmt: skip
        c = Commit(oid, summary, description, tree, sorted(files), sorted(lfs))
        repo.branches.setdefault(branch, []).append(c)
        return c


def _handler(state: HubState, base_url: list[str]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            return None

        # --- plumbing ---
        def _body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                return self.rfile.read(length)
            if (self.headers.get("Transfer-Encoding") or "").lower() == "chunked":
                out = b""
                while True:
                    size = int(self.rfile.readline().strip() or b"0", 16)
                    if size == 0:
                        self.rfile.readline()
                        return out
                    out += self.rfile.read(size)
                    self.rfile.readline()
            return b""

        def _send(self, status: int, payload: Any = None, content_type: str = "application/json",
                  headers: dict[str, str] | None = None) -> None:  # fmt: skip
            data = b"" if payload is None else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str, code: str | None = None) -> None:
            headers = {"X-Error-Message": message}
            if code:
                headers["X-Error-Code"] = code
            self._send(status, {"error": message}, headers=headers)

        def _authorized(self) -> bool:
            if self.headers.get("Authorization") != f"Bearer {state.token}":
                self._error(401, "Invalid credentials in Authorization header")
                return False
            return True

        def _handle(self, method: str) -> None:
            body = self._body()
            with state.lock:
                state.requests.append(Request(method, self.path, {k.lower(): v for k, v in self.headers.items()}, body))
            path = self.path.split("?", 1)[0]
            try:
                self._route(method, path, body)
            except Exception as exc:  # a bug in the test server: answer 500 and say it
                self._error(500, f"test hub server error: {type(exc).__name__}: {exc}")

        def do_GET(self) -> None:
            self._handle("GET")

        def do_POST(self) -> None:
            self._handle("POST")

        def do_PUT(self) -> None:
            if state.drop_uploads and self.path.startswith("/lfs-upload/"):
                self._drop()
                return
            self._handle("PUT")

        def _drop(self) -> None:
            """Read part of the body, then cut the connection without an answer."""
            import socket

            length = int(self.headers.get("Content-Length") or 0)
            partial = self.rfile.read(min(length, 1024)) if length else b""
            with state.lock:
                headers = {k.lower(): v for k, v in self.headers.items()}
                state.requests.append(Request("PUT", self.path, headers, partial))
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)

        # --- routes ---
        def _route(self, method: str, path: str, body: bytes) -> None:
            if method == "GET" and path == "/api/whoami-v2":
                if self._authorized():
                    self._send(200, {"type": "user", "name": state.user, "orgs": [{"name": "test-org"}]})
                return
            if method == "POST" and path == "/api/repos/create":
                if self._authorized():
                    self._create_repo(json.loads(body))
                return
            if method == "POST" and path == "/api/validate-yaml":
                self._validate_yaml(json.loads(body))
                return
            m = re.fullmatch(r"/api/models/(.+?)/(branch|preupload|commit)/([^/]+)", path)
            if m and method == "POST":
                if not self._authorized():
                    return
                repo = state.repos.get(m.group(1))
                if repo is None:
                    self._error(404, "Repository not found", "RepoNotFound")
                    return
                getattr(self, f"_{m.group(2)}")(repo, _unquote(m.group(3)), body)
                return
            m = re.fullmatch(r"/api/models/(.+?)/revision/([^/]+)", path)
            if m and method == "GET":
                if self._authorized():
                    self._info(m.group(1), _unquote(m.group(2)))
                return
            m = re.fullmatch(r"/(.+?)/resolve/([^/]+)/(.+)", path)
            if m and method == "GET":
                if self._authorized():
                    self._resolve(m.group(1), _unquote(m.group(2)), _unquote(m.group(3)))
                return
            m = re.fullmatch(r"/(.+?)\.git/info/lfs/objects/batch", path)
            if m and method == "POST":
                if self._authorized():
                    self._lfs_batch(json.loads(body))
                return
            m = re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", path)
            if m and method == "PUT":
                if hashlib.sha256(body).hexdigest() != m.group(1):
                    self._error(400, "sha256 mismatch")
                    return
                state.lfs[m.group(1)] = body
                self._send(200, None)
                return
            if method == "POST" and path == "/lfs-verify":
                if not self._authorized():
                    return
                info = json.loads(body)
                blob = state.lfs.get(info["oid"])
                if blob is None or len(blob) != info["size"]:
                    self._error(404, "object not uploaded")
                    return
                self._send(200, {})
                return
            self._error(404, f"no route {method} {path}")

        def _info(self, repo_id: str, revision: str) -> None:
            repo = state.repos.get(repo_id)
            if repo is None:
                self._error(404, "Repository not found", "RepoNotFound")
                return
            commit = repo.at(revision)
            if commit is None:
                self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
                return
            siblings = []
            for name, blob in sorted(commit.files.items()):
                entry: dict[str, Any] = {"rfilename": name, "size": len(blob), "blobId": _git_oid(blob)}
                if _is_lfs(name, len(blob)):
                    entry["lfs"] = {"size": len(blob), "sha256": hashlib.sha256(blob).hexdigest(), "pointerSize": 134}
                siblings.append(entry)
            self._send(200, {"id": repo_id, "sha": commit.oid, "private": repo.private, "siblings": siblings})

        def _resolve(self, repo_id: str, revision: str, name: str) -> None:
            repo = state.repos.get(repo_id)
            commit = repo.at(revision) if repo else None
            if commit is None or name not in commit.files:
                self._error(404, "Entry not found", "EntryNotFound")
                return
            blob = commit.files[name]
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(blob)))
            self.send_header("X-Repo-Commit", commit.oid)
            self.end_headers()
            self.wfile.write(blob)

        def _create_repo(self, payload: dict[str, Any]) -> None:
            repo_id = f"{payload.get('organization') or state.user}/{payload['name']}"
            if repo_id in state.repos:
                # the real Hub also returns the url on 409, and huggingface_hub reads it (exist_ok=True)
                message = "You already created this model repo"
                self._send(409, {"error": message, "url": f"{base_url[0]}/{repo_id}"},
                           headers={"X-Error-Message": message})  # fmt: skip
                return
            repo = Repo(repo_id, private=payload.get("visibility") == "private")
            state.repos[repo_id] = repo
            state.commit(repo, "main", "initial commit", "", {".gitattributes": b"*.safetensors filter=lfs\n"}, [])
            self._send(200, {"url": f"{base_url[0]}/{repo_id}", "name": repo_id})

        def _branch(self, repo: Repo, branch: str, body: bytes) -> None:
            if branch in repo.branches:
                self._error(409, "Reference already exists")
                return
            start = (json.loads(body or b"{}") or {}).get("startingPoint") or "main"
            repo.branches[branch] = list(repo.branches.get(start) or [])
            self._send(200, {})

        def _preupload(self, repo: Repo, revision: str, body: bytes) -> None:
            files = json.loads(body)["files"]
            out = []
            for f in files:
                lfs = _is_lfs(f["path"], f["size"])
                out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False})
            self._send(200, {"files": out, "commitOid": None})

        def _lfs_batch(self, payload: dict[str, Any]) -> None:
            objects = []
            for obj in payload["objects"]:
                entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
                if obj["oid"] not in state.lfs:
                    entry["actions"] = {
                        "upload": {"href": f"{base_url[0]}/lfs-upload/{obj['oid']}"},
                        "verify": {"href": f"{base_url[0]}/lfs-verify"},
                    }
                objects.append(entry)
            self._send(200, {"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json")

        def _commit(self, repo: Repo, revision: str, body: bytes) -> None:
            if state.fail_commit_with:
                self._error(state.fail_commit_with, "commit refused by the test server")
                return
            if revision not in repo.branches:
                self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
                return
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            header = next(item["value"] for item in lines if item["key"] == "header")
            if state.foreign_commits > 0:
                state.foreign_commits -= 1
                n = len(repo.branches[revision])
                state.commit(repo, revision, f"someone else's commit {n}", "", {f"other-{n}.txt": b"x"}, [])
            parent = header.get("parentCommit")
            if parent and repo.branches[revision][-1].oid != parent:
                self._error(412, "A commit has happened since. Please refresh and try again.")
                return
            files: dict[str, bytes] = {}
            lfs: list[str] = []
            for item in lines:
                if item["key"] == "file":
                    files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                elif item["key"] == "lfsFile":
                    blob = state.lfs.get(item["value"]["oid"])
                    if blob is None:
                        self._error(400, f"LFS object {item['value']['oid']} was never uploaded")
                        return
                    files[item["value"]["path"]] = blob
                    lfs.append(item["value"]["path"])
            c = state.commit(repo, revision, header["summary"], header.get("description", ""), files, lfs)
            self._send(
                200,
                {"commitUrl": f"{base_url[0]}/{repo.repo_id}/commit/{c.oid}", "commitOid": c.oid,
                 "pullRequestUrl": None},
            )  # fmt: skip

        def _validate_yaml(self, payload: dict[str, Any]) -> None:
            content = payload.get("content", "")
            errors = []
            if content.startswith("---"):
                end = content.find("\n---", 3)
                try:
                    meta = yaml.safe_load(content[3:end]) if end > 0 else None
                    if not isinstance(meta, dict):
                        errors.append({"message": "metadata is not a mapping"})
                except yaml.YAMLError as exc:
                    errors.append({"message": f"invalid YAML: {exc}"})
            if errors:
                self._send(400, {"errors": errors, "warnings": []})
            else:
                self._send(200, {"errors": [], "warnings": []})

    return Handler


def _is_lfs(path: str, size: int) -> bool:
    return path.endswith(LFS_SUFFIXES) or size > 10 * 1024 * 1024


def _git_oid(blob: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(blob) + blob, usedforsecurity=False).hexdigest()


def _unquote(s: str) -> str:
    from urllib.parse import unquote

    return unquote(s)


class HubServer:
    """Start with ``with HubServer(token) as hub: ...``; ``hub.url`` is the endpoint."""

    def __init__(self, token: str) -> None:
        self.state = HubState(token)
        self._base: list[str] = [""]
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.state, self._base))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._base[0] = self.url
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    @property
    def requests(self) -> list[Request]:
        return list(self.state.requests)

    def commits(self, repo_id: str, branch: str = "main") -> list[Commit]:
        return list(self.state.repos[repo_id].branches.get(branch) or [])
