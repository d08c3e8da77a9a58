"""A small stand-in for the Hugging Face Hub on 127.0.0.1, standard library only, for tests.

It speaks the parts of the Hub HTTP API that the real `huggingface_hub` client uses to create a repo, upload
(preupload, LFS batch + PUT + verify, ndjson commit, branch creation, README metadata validation) and download
(repo/revision info, recursive tree listing, `resolve` HEAD/GET with ranges). It keeps every commit, stores what it
receives in memory and logs every request, so tests can assert what reached the "Hub" byte for byte, and that a
dry run sent nothing.

Point the client at it with `HF_ENDPOINT=<server.url>` in a subprocess's environment and `HF_HUB_DISABLE_XET=1`:
with `hf_xet` installed huggingface_hub uploads through the Xet CAS protocol, which this server does not speak;
with it disabled the client uses the preupload + LFS + commit path described above. Downloads use plain HTTP
because the server never sends `X-Xet-Hash`.
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
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".model", ".h5", ".msgpack")
REGULAR_MAX = 1_000_000  # larger files go to LFS, like the Hub's 10 MB rule (small, so tests exercise both)


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class StoredFile:
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def entry(self, path: str) -> dict[str, Any]:
        e: dict[str, Any] = {"type": "file", "path": path, "size": len(self.data), "oid": git_blob_oid(self.data)}
        if self.lfs:
            e["lfs"] = {"oid": self.sha256, "size": len(self.data), "pointerSize": 134}
        return e


@dataclass
class Commit:
    oid: str
    parent: str | None
    message: str
    description: str
    files: dict[str, StoredFile]


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)


@dataclass
class Request:
    method: str
    path: str
    authorization: str | None
    range: str | None = None


class FakeHub:
    """`with FakeHub() as hub:` serves on `hub.url` until exit."""

    def __init__(self, token: str | None = None) -> None:
        self.token = token  # when set, write endpoints demand `Authorization: Bearer <token>`
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}  # sha256 -> content, as received by the LFS PUTs
        self.requests: list[Request] = []
        self.fail_commits = 0  # > 0: the next commits answer 500 (an interrupted push), counting down
        self.lock = threading.RLock()
        self._counter = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeHub":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ---- helpers for tests -----------------------------------------------------------------------------------
    def add_repo(self, repo_id: str, files: dict[str, bytes], *, private: bool = False, message: str = "init") -> str:
        """Create `repo_id` with one commit holding `files`; returns the commit oid."""
        with self.lock:
            repo = self.repos.setdefault(repo_id, Repo(repo_id, private))
            stored = {p: StoredFile(d, p.endswith(LFS_SUFFIXES) or len(d) > REGULAR_MAX) for p, d in files.items()}
            return self._commit(repo, "main", message, "", stored)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        oid = repo.branches.get(revision, revision)
        return {p: f.data for p, f in repo.commits[oid].files.items()}

    def head(self, repo_id: str, revision: str = "main") -> Commit:
        repo = self.repos[repo_id]
        return repo.commits[repo.branches[revision]]

    def requests_to(self, fragment: str, method: str | None = None) -> list[Request]:
        return [r for r in self.requests if fragment in r.path and (method is None or r.method == method)]

    # ---- internals -------------------------------------------------------------------------------------------
    def _commit(self, repo: Repo, branch: str, message: str, description: str, files: dict[str, StoredFile]) -> str:
        self._counter += 1
        parent = repo.branches.get(branch)
        oid = hashlib.sha1(f"{repo.repo_id}:{branch}:{self._counter}:{message}".encode()).hexdigest()
        repo.commits[oid] = Commit(oid, parent, message, description, files)
        repo.branches[branch] = oid
        return oid

    def _resolve(self, repo: Repo, revision: str) -> Commit | None:
        oid = repo.branches.get(revision, revision)
        if oid not in repo.commits:
            return None
        return repo.commits[oid]


def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        # ---- plumbing ----------------------------------------------------------------------------------------
        def _body(self) -> bytes:
            if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                out = bytearray()
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return bytes(out)
                    out += self.rfile.read(size)
                    self.rfile.readline()
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, *,
                  content_type: str = "application/json", head: bool = False) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
            self._send(status, json.dumps(obj).encode(), headers)

        def _error(self, status: int, code: str | None, message: str, head: bool = False) -> None:
            self._send(status, json.dumps({"error": message}).encode(), {"X-Error-Code": code} if code else {},
                       head=head)

        def _authorized(self) -> bool:
            return hub.token is None or self.headers.get("Authorization") == f"Bearer {hub.token}"

        def _repo(self, repo_id: str, *, head: bool = False) -> Repo | None:
            repo = hub.repos.get(repo_id)
            if repo is None or (repo.private and not self._authorized()):
                self._error(404, "RepoNotFound", f"Repository not found: {repo_id}", head=head)
                return None
            return repo

        def _commit_at(self, repo_id: str, rev: str, *, head: bool = False) -> Commit | None:
            """The commit `rev` names in `repo_id`; None after answering 404 (no such repo or revision)."""
            repo = self._repo(repo_id, head=head)
            if repo is None:
                return None
            commit = hub._resolve(repo, rev)
            if commit is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head=head)
            return commit

        # ---- dispatch ----------------------------------------------------------------------------------------
        def _dispatch(self, method: str) -> None:
            url = urlsplit(self.path)
            path, query = url.path, parse_qs(url.query)
            with hub.lock:
                hub.requests.append(Request(method, self.path, self.headers.get("Authorization"),
                                            self.headers.get("Range")))
            body = self._body() if method in ("POST", "PUT") else b""
            with hub.lock:
                try:
                    self._route(method, path, query, body)
                except Exception as e:  # a bug in the fake: make it visible to the test
                    self._error(500, None, f"fake hub error: {type(e).__name__}: {e}")
                    raise

        def do_GET(self) -> None:
            self._dispatch("GET")

        def do_HEAD(self) -> None:
            self._dispatch("HEAD")

        def do_POST(self) -> None:
            self._dispatch("POST")

        def do_PUT(self) -> None:
            self._dispatch("PUT")

        def _route(self, method: str, path: str, query: dict[str, list[str]], body: bytes) -> None:
            if method == "POST" and path == "/api/repos/create":
                return self._create_repo(json.loads(body or b"{}"))
            if method == "POST" and path == "/api/validate-yaml":
                return self._json(200, {"errors": [], "warnings": []})
            if method == "PUT" and path.startswith("/__lfs/"):
                return self._lfs_put(path[len("/__lfs/"):], body)
            if method == "POST" and path == "/__lfs_verify":
                return self._lfs_verify(json.loads(body))
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/(revision|tree|preupload|commit|branch)/([^/]+)(/.*)?)?",
                             path)
            if m:
                repo_id, action, rev, rest = m.group(1), m.group(2), m.group(3), m.group(4)
                rev = unquote(rev) if rev else "main"
                if method == "GET" and action in (None, "revision"):
                    return self._info(repo_id, rev)
                if method == "GET" and action == "tree":
                    return self._tree(repo_id, rev, unquote(rest[1:]) if rest else "", query)
                if method == "POST" and action == "preupload":
                    return self._preupload(repo_id, rev, json.loads(body))
                if method == "POST" and action == "commit":
                    return self._commit(repo_id, rev, body)
                if method == "POST" and action == "branch":
                    return self._branch(repo_id, rev, json.loads(body or b"{}"))
            m = re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path)
            if m and method == "POST":
                return self._lfs_batch(m.group(1), json.loads(body))
            m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            if m and method in ("GET", "HEAD"):
                return self._resolve(m.group(1), unquote(m.group(2)), unquote(m.group(3)), head=method == "HEAD")
            self._error(404, None, f"fake hub: no route for {method} {path}", head=method == "HEAD")

        # ---- endpoints ---------------------------------------------------------------------------------------
        def _create_repo(self, payload: dict[str, Any]) -> None:
            if not self._authorized():
                return self._error(401, None, "Invalid credentials in Authorization header")
            repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
            url = f"{hub.url}/{repo_id}"
            if repo_id in hub.repos:
                return self._json(409, {"error": "You already created this model repo", "url": url})
            private = payload.get("visibility") == "private" or bool(payload.get("private"))
            repo = hub.repos[repo_id] = Repo(repo_id, private)
            attributes = StoredFile(b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n", False)
            hub._commit(repo, "main", "initial commit", "", {".gitattributes": attributes})
            self._json(200, {"url": url, "name": repo_id, "id": repo_id})

        def _info(self, repo_id: str, rev: str) -> None:
            commit = self._commit_at(repo_id, rev)
            if commit is None:
                return
            self._json(200, {
                "id": repo_id, "modelId": repo_id, "sha": commit.oid, "private": hub.repos[repo_id].private,
                "lastModified": "2026-01-01T00:00:00.000Z", "tags": [], "library_name": None,
                "siblings": [{"rfilename": p} for p in sorted(commit.files)],
            })

        def _tree(self, repo_id: str, rev: str, under: str, query: dict[str, list[str]]) -> None:
            commit = self._commit_at(repo_id, rev)
            if commit is None:
                return
            recursive = (query.get("recursive") or ["False"])[0].lower() in ("1", "true")
            prefix = under.rstrip("/") + "/" if under else ""
            entries: dict[str, dict[str, Any]] = {}
            for p, f in sorted(commit.files.items()):
                if not p.startswith(prefix):
                    continue
                rel = p[len(prefix):]
                parts = rel.split("/")
                for i in range(1, len(parts)):  # folders on the way
                    if not recursive and i > 1:
                        break
                    d = prefix + "/".join(parts[:i])
                    entries.setdefault(d, {"type": "directory", "path": d, "oid": git_blob_oid(d.encode())})
                if recursive or len(parts) == 1:
                    entries[p] = f.entry(p)
            self._json(200, list(entries.values()))

        def _preupload(self, repo_id: str, rev: str, payload: dict[str, Any]) -> None:
            repo = self._repo(repo_id)
            if repo is None:
                return
            commit = hub._resolve(repo, rev)
            files = commit.files if commit else {}
            out = []
            for f in payload["files"]:
                sample = base64.b64decode(f["sample"])
                lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] > REGULAR_MAX or b"\x00" in sample
                existing = files.get(f["path"])
                oid = None
                if existing is not None and existing.lfs == lfs:
                    oid = existing.sha256 if lfs else git_blob_oid(existing.data)
                out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                            "oid": oid})
            self._json(200, {"files": out, "commitOid": commit.oid if commit else None})

        def _lfs_batch(self, repo_id: str, payload: dict[str, Any]) -> None:
            if not self._authorized():
                return self._error(401, None, "Invalid credentials in Authorization header")
            if self._repo(repo_id) is None:
                return
            objects = []
            for o in payload["objects"]:
                entry: dict[str, Any] = {"oid": o["oid"], "size": o["size"], "authenticated": True}
                if o["oid"] not in hub.lfs:  # already stored: no actions, the client skips the upload
                    entry["actions"] = {
                        "upload": {"href": f"{hub.url}/__lfs/{o['oid']}", "header": {}},
                        "verify": {"href": f"{hub.url}/__lfs_verify", "header": {}},
                    }
                objects.append(entry)
            self._json(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

        def _lfs_put(self, oid: str, body: bytes) -> None:
            if hashlib.sha256(body).hexdigest() != oid:
                return self._error(400, None, "sha256 of the uploaded content does not match the oid")
            hub.lfs[oid] = body
            self._send(200, b"", {"ETag": f'"{oid}"'})

        def _lfs_verify(self, payload: dict[str, Any]) -> None:
            data = hub.lfs.get(payload["oid"])
            if data is None or len(data) != payload["size"]:
                return self._error(404, None, "object not found")
            self._json(200, {"success": True})

        def _branch(self, repo_id: str, branch: str, payload: dict[str, Any]) -> None:
            if not self._authorized():
                return self._error(401, None, "Invalid credentials in Authorization header")
            repo = self._repo(repo_id)
            if repo is None:
                return
            if branch in repo.branches:
                return self._error(409, None, "Reference already exists")
            start = hub._resolve(repo, payload.get("startingPoint") or "main")
            if start is None:
                return self._error(404, "RevisionNotFound", "starting point not found")
            repo.branches[branch] = start.oid
            self._json(200, {})

        def _commit(self, repo_id: str, rev: str, body: bytes) -> None:
            if not self._authorized():
                return self._error(401, None, "Invalid credentials in Authorization header")
            if hub.fail_commits > 0:
                hub.fail_commits -= 1
                return self._error(500, None, "Internal Error - simulated interruption")
            repo = self._repo(repo_id)
            if repo is None:
                return
            base = hub._resolve(repo, rev)
            if base is None or rev not in repo.branches:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            files = dict(base.files)
            header: dict[str, Any] = {}
            for line in body.splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                key, value = item["key"], item["value"]
                if key == "header":
                    header = value
                elif key == "file":
                    files[value["path"]] = StoredFile(base64.b64decode(value["content"]), False)
                elif key == "lfsFile":
                    data = hub.lfs.get(value["oid"])
                    if data is None or len(data) != value["size"]:
                        return self._error(422, None, f"LFS object {value['oid']} was never uploaded")
                    files[value["path"]] = StoredFile(data, True)
                elif key == "deletedFile":
                    files.pop(value["path"], None)
                elif key == "deletedFolder":
                    pre = value["path"].rstrip("/") + "/"
                    files = {p: f for p, f in files.items() if not p.startswith(pre)}
                else:
                    return self._error(400, None, f"unsupported commit operation {key}")
            oid = hub._commit(repo, rev, header.get("summary", ""), header.get("description", ""), files)
            self._json(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{oid}", "commitOid": oid,
                             "pullRequestUrl": None, "success": True})

        def _resolve(self, repo_id: str, rev: str, filename: str, *, head: bool) -> None:
            commit = self._commit_at(repo_id, rev, head=head)
            if commit is None:
                return
            f = commit.files.get(filename)
            if f is None:
                return self._send(404, b"", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit.oid}, head=head)
            etag = f.sha256 if f.lfs else git_blob_oid(f.data)
            headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
            data, status = f.data, 200
            rng = self.headers.get("Range")
            if rng and not head:
                m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
                if m:
                    start = int(m.group(1))
                    stop = int(m.group(2)) + 1 if m.group(2) else len(data)
                    headers["Content-Range"] = f"bytes {start}-{stop - 1}/{len(data)}"
                    data, status = data[start:stop], 206
            self._send(status, data, headers, content_type="application/octet-stream", head=head)

    return Handler
