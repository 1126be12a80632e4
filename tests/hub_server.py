"""A small Hugging Face Hub on 127.0.0.1 for the tests: the subset of the Hub HTTP API that the real
`huggingface_hub` client (and through it `transformers`, `peft` and `datasets`) uses to create repos, commit files
(regular and LFS), manage branches, resolve revisions and download or range-read files.

Nothing here mocks the client: tests point `HF_ENDPOINT` at `HubServer.url` and use the libraries as a user does.
State lives in memory; every commit is a full snapshot of the repo's files, so any earlier commit stays readable.

Routes (repo ids are `namespace/name`; revisions are branch names, tags or commit shas, URL-quoted when they contain
a slash, e.g. `refs%2Fconvert%2Fparquet`):

* `POST /api/repos/create`, `GET /api/whoami-v2`, `POST /api/validate-yaml`
* `GET /api/{type}s/{repo}[/revision/{rev}]` (repo info), `GET /api/{type}s/{repo}/refs`,
  `GET /api/{type}s/{repo}/commits/{rev}`, `POST /api/{type}s/{repo}/branch/{branch}`
* `GET /api/{type}s/{repo}/tree/{rev}[/{path}]`, `POST /api/{type}s/{repo}/paths-info/{rev}`
* `POST /api/{type}s/{repo}/preupload/{rev}`, `POST /api/{type}s/{repo}/commit/{rev}` (ndjson)
* `POST /{prefix}{repo}.git/info/lfs/objects/batch`, `PUT /_lfs/{sha256}` (basic LFS transfer)
* `HEAD|GET /{prefix}{repo}/resolve/{rev}/{path}` with `X-Repo-Commit`, `ETag`, `X-Linked-Etag`, `X-Linked-Size`
  and `Range` support.

Test hooks: `HubServer.fail_with(status, path_contains)` makes matching requests fail (e.g. a 500), and a repo
created private is only visible with a known token (`HubServer.tokens`); an unknown token gets a 401.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

DEFAULT_TOKEN = "hf_loopback_test_token"
USER = "tester"
# What the Hub's default .gitattributes stores with LFS (a subset), plus anything over 10 MB.
LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.parquet", "*.arrow", "*.zip", "*.gz", "*.png", "*.jpg")
LFS_THRESHOLD = 10 * 1024 * 1024
GITATTRIBUTES = "".join(f"{pattern} filter=lfs diff=lfs merge=lfs -text\n" for pattern in LFS_PATTERNS)


def git_blob_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass(frozen=True)
class Blob:
    content: bytes
    lfs: bool

    @property
    def oid(self) -> str:
        return git_blob_oid(self.content)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.oid


@dataclass
class Commit:
    sha: str
    parent: str | None
    files: dict[str, Blob]
    title: str
    date: str


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    created_at: str = ""

    def resolve(self, revision: str) -> Commit | None:
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        if revision in self.commits:
            return self.commits[revision]
        return None


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


class HubServer:
    """The loopback Hub. Use as a context manager or call `start()` / `stop()`."""

    def __init__(self, tokens: tuple[str, ...] = (DEFAULT_TOKEN,)):
        self.tokens = set(tokens)
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.failures: list[tuple[int, str, str | None]] = []
        self.lock = threading.RLock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "HubServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- test hooks --------------------------------------------------------------------------------------------
    def fail_with(self, status: int, path_contains: str, method: str | None = None) -> None:
        """Answer every request (of `method`, or any) whose path contains `path_contains` with `status`."""
        with self.lock:
            self.failures.append((status, path_contains, method))

    def clear_failures(self) -> None:
        with self.lock:
            self.failures.clear()

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        return self.repos[(repo_type, repo_id)]

    # --- repo operations ---------------------------------------------------------------------------------------
    def create_repo(self, repo_type: str, repo_id: str, private: bool) -> Repo:
        with self.lock:
            if (repo_type, repo_id) in self.repos:
                raise HubError(409, "You already created this repo", None)
            repo = Repo(repo_type, repo_id, private, created_at=_now())
            initial = Commit(uuid.uuid4().hex + uuid.uuid4().hex[:8], None,
                             {".gitattributes": Blob(GITATTRIBUTES.encode(), False)}, "initial commit", _now())
            repo.commits[initial.sha] = initial
            repo.branches["main"] = initial.sha
            self.repos[(repo_type, repo_id)] = repo
            return repo

    def commit(self, repo: Repo, revision: str, lines: list[dict]) -> Commit:
        with self.lock:
            if revision not in repo.branches:
                raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            head = repo.commits[repo.branches[revision]]
            header = lines[0]["value"] if lines and lines[0].get("key") == "header" else {}
            parent = header.get("parentCommit")
            if parent is not None and parent != head.sha:
                raise HubError(412, f"A commit has happened since {parent}", None)
            files = dict(head.files)
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                if key == "file":
                    files[value["path"]] = Blob(base64.b64decode(value["content"]), False)
                elif key == "lfsFile":
                    if value["oid"] not in self.lfs:
                        raise HubError(400, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                    files[value["path"]] = Blob(self.lfs[value["oid"]], True)
                elif key == "deletedFile":
                    if value["path"] not in files:
                        raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                    del files[value["path"]]
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    files = {p: b for p, b in files.items() if not p.startswith(prefix)}
                else:
                    raise HubError(400, f"Unknown commit operation {key!r}")
            commit = Commit(uuid.uuid4().hex + uuid.uuid4().hex[:8], head.sha, files,
                            header.get("summary", ""), _now())
            repo.commits[commit.sha] = commit
            repo.branches[revision] = commit.sha
            return commit


def _tree_entries(commit: Commit, path: str, recursive: bool) -> list[dict]:
    """Entries of the Hub's tree API under `path` (files and directories)."""
    prefix = path.strip("/") + "/" if path.strip("/") else ""
    entries: dict[str, dict] = {}
    for file_path, blob in sorted(commit.files.items()):
        if not file_path.startswith(prefix):
            continue
        rest = file_path[len(prefix):]
        parts = rest.split("/")
        if len(parts) > 1:  # directories on the way
            for depth in range(1, len(parts) if recursive else 2):
                directory = prefix + "/".join(parts[:depth])
                entries.setdefault(directory, {"type": "directory", "oid": git_blob_oid(directory.encode()),
                                               "size": 0, "path": directory})
            if not recursive:
                continue
        entries[file_path] = _file_entry(file_path, blob)
    return list(entries.values())


def _file_entry(path: str, blob: Blob) -> dict:
    entry = {"type": "file", "oid": blob.oid, "size": len(blob.content), "path": path}
    if blob.lfs:
        entry["lfs"] = {"oid": blob.sha256, "size": len(blob.content), "pointerSize": 134}
    return entry


def _make_handler(hub: HubServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        # --- plumbing ------------------------------------------------------------------------------------------
        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        self.rfile.readline()  # the empty line after the last chunk
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _json(self, status: int, data, headers: dict | None = None) -> None:
            self._send(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})

        def _error(self, error: HubError) -> None:
            headers = {"X-Error-Message": error.message}
            if error.code:
                headers["X-Error-Code"] = error.code
            self._send(error.status, json.dumps({"error": error.message}).encode(),
                       {"Content-Type": "application/json", **headers}, head=self.command == "HEAD")

        def _token(self) -> str | None:
            auth = self.headers.get("Authorization", "")
            token = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
            if token is not None and token not in hub.tokens:
                raise HubError(401, "Invalid credentials in Authorization header")
            return token

        def _repo(self, repo_type: str, repo_id: str, write: bool = False) -> Repo:
            token = self._token()
            repo = hub.repos.get((repo_type, repo_id))
            if write and token is None:
                raise HubError(401, "You must be authenticated to write to a repo")
            if repo is None or (repo.private and token is None):
                raise HubError(404, "Repository not found", "RepoNotFound")
            return repo

        def _commit(self, repo: Repo, revision: str) -> Commit:
            commit = repo.resolve(revision)
            if commit is None:
                raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            return commit

        def _dispatch(self) -> None:
            hub.requests.append((self.command, self.path))
            try:
                for status, needle, method in list(hub.failures):
                    if needle in self.path and method in (None, self.command):
                        raise HubError(status, f"Injected failure {status}")
                self._route()
            except HubError as error:
                self._error(error)

        do_GET = do_HEAD = do_POST = do_PUT = _dispatch

        # --- routing -------------------------------------------------------------------------------------------
        def _route(self) -> None:
            split = urlsplit(self.path)
            query = parse_qs(split.query)
            parts = split.path.strip("/").split("/")  # still quoted: a quoted revision stays one part
            method = self.command
            if parts[:2] == ["api", "whoami-v2"]:
                self._token()
                return self._json(200, {"type": "user", "name": USER, "orgs": [], "auth": {"type": "access_token"}})
            if parts[:2] == ["api", "validate-yaml"]:
                return self._validate_yaml()
            if parts[:3] == ["api", "repos", "create"] and method == "POST":
                return self._create_repo()
            if parts[0] == "api" and len(parts) >= 4 and parts[1] in ("models", "datasets", "spaces"):
                repo_type, repo_id, rest = parts[1][:-1], f"{unquote(parts[2])}/{unquote(parts[3])}", parts[4:]
                return self._api(method, repo_type, repo_id, rest, query)
            if parts[0] == "_lfs" and method == "PUT":
                return self._lfs_put(parts[1])
            repo_type = "model"
            if parts[0] in ("datasets", "spaces"):
                repo_type, parts = parts[0][:-1], parts[1:]
            if len(parts) >= 2 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs", "objects", "batch"]:
                return self._lfs_batch(repo_type, f"{parts[0]}/{parts[1][:-4]}")
            if len(parts) >= 5 and parts[2] == "resolve":
                repo_id = f"{unquote(parts[0])}/{unquote(parts[1])}"
                return self._resolve(repo_type, repo_id, unquote(parts[3]), unquote("/".join(parts[4:])))
            raise HubError(404, f"No route for {method} {split.path}")

        def _api(self, method: str, repo_type: str, repo_id: str, rest: list[str], query: dict) -> None:
            if not rest or rest[0] == "revision":
                repo = self._repo(repo_type, repo_id)
                revision = unquote(rest[1]) if rest else "main"
                return self._json(200, self._info(repo, self._commit(repo, revision)))
            action, args = rest[0], [unquote(p) for p in rest[1:]]
            if action == "refs":
                repo = self._repo(repo_type, repo_id)
                branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": s}
                            for n, s in repo.branches.items() if not n.startswith("refs/")]
                converts = [{"name": n.split("/")[-1], "ref": n, "targetCommit": s}
                            for n, s in repo.branches.items() if n.startswith("refs/convert/")]
                return self._json(200, {"branches": branches, "converts": converts, "tags": []})
            if action == "commits":
                repo = self._repo(repo_type, repo_id)
                commit, history = self._commit(repo, args[0] if args else "main"), []
                while commit is not None:
                    history.append({"id": commit.sha, "title": commit.title, "message": "", "authors": [
                        {"user": USER}], "date": commit.date})
                    commit = repo.commits.get(commit.parent) if commit.parent else None
                return self._json(200, history)
            if action == "branch" and method == "POST":
                repo = self._repo(repo_type, repo_id, write=True)
                body = json.loads(self._body() or b"{}")
                start = self._commit(repo, body.get("startingPoint") or "main")
                branch = "/".join(args)
                if branch in repo.branches:
                    raise HubError(409, f"Branch {branch} already exists")
                repo.branches[branch] = start.sha
                return self._json(200, {})
            if action == "tree":
                repo = self._repo(repo_type, repo_id)
                commit = self._commit(repo, args[0])
                recursive = query.get("recursive", ["false"])[0].lower() == "true"
                path = "/".join(args[1:])
                if path and path not in commit.files and not any(p.startswith(path + "/") for p in commit.files):
                    raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
                return self._json(200, _tree_entries(commit, path, recursive))
            if action == "paths-info" and method == "POST":
                repo = self._repo(repo_type, repo_id)
                commit = self._commit(repo, args[0])
                form = parse_qs(self._body().decode())
                paths = form.get("paths", [])
                result = []
                for path in paths:
                    if path in commit.files:
                        result.append(_file_entry(path, commit.files[path]))
                    elif any(p.startswith(path.rstrip("/") + "/") for p in commit.files):
                        result.append({"type": "directory", "oid": git_blob_oid(path.encode()), "size": 0,
                                       "path": path})
                return self._json(200, result)
            if action == "preupload" and method == "POST":
                repo = self._repo(repo_type, repo_id, write=True)
                commit = self._commit(repo, args[0])
                files = []
                for item in json.loads(self._body())["files"]:
                    lfs = item["size"] > LFS_THRESHOLD or any(
                        fnmatch.fnmatch(item["path"].split("/")[-1], p) for p in LFS_PATTERNS)
                    existing = commit.files.get(item["path"])
                    oid = None if existing is None else (existing.sha256 if existing.lfs else existing.oid)
                    files.append({"path": item["path"], "uploadMode": "lfs" if lfs else "regular",
                                  "shouldIgnore": False, "oid": oid})
                return self._json(200, {"files": files, "commitOid": commit.sha})
            if action == "commit" and method == "POST":
                repo = self._repo(repo_type, repo_id, write=True)
                lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
                commit = hub.commit(repo, args[0], lines)
                prefix = "" if repo_type == "model" else f"{repo_type}s/"
                return self._json(200, {"commitUrl": f"{hub.url}/{prefix}{repo_id}/commit/{commit.sha}",
                                        "commitOid": commit.sha, "success": True})
            raise HubError(404, f"No API route {action!r}")

        def _info(self, repo: Repo, commit: Commit) -> dict:
            card = commit.files.get("README.md")
            card_data = {}
            if card is not None:
                match = re.match(r"^---\n(.*?)\n---", card.content.decode(errors="replace"), flags=re.S)
                card_data = yaml.safe_load(match.group(1)) if match else {}
            return {
                "_id": repo.repo_id, "id": repo.repo_id, "author": repo.repo_id.split("/")[0], "sha": commit.sha,
                "lastModified": commit.date, "createdAt": repo.created_at, "private": repo.private,
                "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": card_data.get("tags") or [],
                "cardData": card_data, "siblings": [{"rfilename": p} for p in sorted(commit.files)],
            }

        def _create_repo(self) -> None:
            if self._token() is None:
                raise HubError(401, "You must be authenticated to create a repo")
            body = json.loads(self._body())
            repo_id = f"{body.get('organization') or USER}/{body['name']}"
            repo_type = body.get("type") or "model"
            prefix = "" if repo_type == "model" else f"{repo_type}s/"
            url = f"{hub.url}/{prefix}{repo_id}"
            try:
                hub.create_repo(repo_type, repo_id, bool(body.get("private")))
            except HubError as error:  # as the Hub: a 409 that still names the repo's url
                return self._json(error.status, {"error": error.message, "url": url},
                                  {"X-Error-Message": error.message})
            return self._json(200, {"url": url, "name": repo_id})

        def _validate_yaml(self) -> None:
            content = json.loads(self._body())["content"]
            match = re.match(r"^---\n(.*?)\n---", content, flags=re.S)
            try:
                metadata = yaml.safe_load(match.group(1)) if match else {}
            except yaml.YAMLError as error:
                return self._json(400, {"errors": [{"message": f"Invalid YAML: {error}"}]})
            if metadata is not None and not isinstance(metadata, dict):
                return self._json(400, {"errors": [{"message": "metadata must be a mapping"}]})
            return self._json(200, {"errors": [], "warnings": []})

        def _lfs_batch(self, repo_type: str, repo_id: str) -> None:
            self._repo(repo_type, repo_id, write=True)
            body = json.loads(self._body())
            objects = []
            for obj in body["objects"]:
                entry = {"oid": obj["oid"], "size": obj["size"]}
                if obj["oid"] not in hub.lfs:
                    entry["actions"] = {"upload": {"href": f"{hub.url}/_lfs/{obj['oid']}"}}
                objects.append(entry)
            return self._json(200, {"transfer": "basic", "objects": objects})

        def _lfs_put(self, oid: str) -> None:
            content = self._body()
            if hashlib.sha256(content).hexdigest() != oid:
                raise HubError(400, "LFS upload does not match its sha256")
            hub.lfs[oid] = content
            return self._send(200)

        def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
            repo = self._repo(repo_type, repo_id)
            commit = self._commit(repo, revision)
            blob = commit.files.get(path)
            if blob is None:
                raise HubError(404, "Entry not found", "EntryNotFound")
            headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{blob.oid}"', "Accept-Ranges": "bytes",
                       "Content-Type": "application/octet-stream"}
            if blob.lfs:
                headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(len(blob.content))})
            content, status = blob.content, 200
            match = re.match(r"bytes=(\d*)-(\d*)", self.headers.get("Range", ""))
            if match:
                size = len(content)
                if match.group(1):
                    start = int(match.group(1))
                    end = int(match.group(2)) if match.group(2) else size - 1
                else:  # suffix range: the last N bytes
                    start, end = max(size - int(match.group(2)), 0), size - 1
                end = min(end, size - 1)
                if start >= size:
                    self._send(416, b"", {"Content-Range": f"bytes */{size}"}, head=self.command == "HEAD")
                    return
                content, status = content[start:end + 1], 206
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            return self._send(status, content, headers, head=self.command == "HEAD")

    return Handler
