"""A stand-in for the Hugging Face hub on 127.0.0.1: the part of its HTTP API huggingface_hub downloads with.

`HubServer({"owner/name": folder, ...})` serves each local folder as one model repo at a single
commit (a hash of its files), for the revision `main` or that hash:

    GET  /api/models/{repo}/revision/{rev}        model info: id, sha, siblings (HfApi.model_info / repo_info)
    GET  /api/models/{repo}/tree/{rev}[/{dir}]    file and folder entries, ?recursive= (HfApi.list_repo_tree,
                                                  list_repo_files, snapshot_download's listing)
    HEAD /{repo}/resolve/{rev}/{path}             X-Repo-Commit, ETag, Content-Length (get_hf_file_metadata)
    GET  /{repo}/resolve/{rev}/{path}             the bytes, same headers (hf_hub_download)

Weight files (*.bin, *.safetensors) are described as git-LFS files, as on the hub: the tree gives
their sha256 and size under `lfs`, and their ETag is the sha256; other files' ETag is the git blob
id. Unknown repos, revisions and files answer 404 with the hub's X-Error-Code (RepoNotFound,
RevisionNotFound, EntryNotFound), which huggingface_hub turns into its own exceptions. Every
request is logged as (method, path) so tests can assert what was fetched. No redirects, no Xet,
no auth; point a client at it with HF_ENDPOINT=server.url and HF_HUB_DISABLE_XET=1.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".bin", ".safetensors")


class Repo:
    """One folder served as a model repo: its files' bytes and hashes, and the commit they make."""

    def __init__(self, repo_id: str, folder: Path):
        self.repo_id = repo_id
        self.files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        self.blob_ids = {path: hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() for path, data in self.files.items()}
        self.sha256 = {path: hashlib.sha256(data).hexdigest() for path, data in self.files.items()}
        listing = "".join(f"{path}\0{blob}\n" for path, blob in self.blob_ids.items())
        self.commit = hashlib.sha1(f"{repo_id}\n{listing}".encode()).hexdigest()

    def is_lfs(self, path: str) -> bool:
        return path.endswith(LFS_SUFFIXES)

    def etag(self, path: str) -> str:
        return self.sha256[path] if self.is_lfs(path) else self.blob_ids[path]

    def folders(self) -> list[str]:
        return sorted({"/".join(path.split("/")[:depth]) for path in self.files for depth in range(1, path.count("/") + 1)})

    def tree(self, under: str, recursive: bool) -> list[dict]:
        """Tree entries below `under` ("" = root): folders then files, as the hub's tree endpoint lists them."""
        prefix = f"{under}/" if under else ""

        def listed(path: str) -> bool:
            return path.startswith(prefix) and (recursive or "/" not in path[len(prefix):])

        entries: list[dict] = [
            {"type": "directory", "oid": hashlib.sha1(f"tree {folder}".encode()).hexdigest(), "size": 0, "path": folder}
            for folder in self.folders() if listed(folder)
        ]
        for path, data in self.files.items():
            if listed(path):
                entry = {"type": "file", "oid": self.blob_ids[path], "size": len(data), "path": path}
                if self.is_lfs(path):
                    entry["lfs"] = {"oid": self.sha256[path], "size": len(data), "pointerSize": 134}
                entries.append(entry)
        return entries

    def info(self) -> dict:
        return {
            "_id": self.commit[:24], "id": self.repo_id, "modelId": self.repo_id, "author": self.repo_id.split("/")[0],
            "sha": self.commit, "private": False, "gated": False, "disabled": False, "downloads": 0, "likes": 0,
            "tags": [], "lastModified": "2024-01-01T00:00:00.000Z", "createdAt": "2024-01-01T00:00:00.000Z",
            "siblings": [{"rfilename": path} for path in self.files],
        }


class HubServer:
    """The server, running in a daemon thread from `start()` to `stop()`; `requests` logs (method, path)."""

    def __init__(self, repos: dict[str, Path]):
        self.repos = {repo_id: Repo(repo_id, Path(folder)) for repo_id, folder in repos.items()}
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "HubServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def log(self, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((method, path))

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    def downloaded(self, repo_id: str) -> list[str]:
        """Files of `repo_id` whose bytes were sent (GET on /resolve/), in request order."""
        marker = f"/{repo_id}/resolve/"
        return [path.split(marker, 1)[1].split("/", 1)[1] for method, path in self.requests
                if method == "GET" and path.startswith(marker)]

    def touched(self, repo_id: str) -> list[str]:
        """Files of `repo_id` asked about at all (HEAD or GET on /resolve/)."""
        marker = f"/{repo_id}/resolve/"
        return [path.split(marker, 1)[1].split("/", 1)[1] for _, path in self.requests if path.startswith(marker)]


def _split_repo(rest: str, separator: str) -> tuple[str, str] | None:
    """("owner/name", what follows `separator`) from "owner/name/<separator>/...", or None."""
    if f"/{separator}/" not in rest:
        return None
    repo_id, tail = rest.split(f"/{separator}/", 1)
    return repo_id, tail


def _handler_for(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: every response carries Content-Length

        def log_message(self, format, *args):  # the request log is hub.requests, not stderr
            pass

        def do_GET(self):
            self._answer(send_body=True)

        def do_HEAD(self):
            self._answer(send_body=False)

        def _send(self, status: int, body: bytes, headers: dict[str, str], send_body: bool) -> None:
            self.send_response(status)
            for name, value in {"Content-Length": str(len(body)), **headers}.items():
                self.send_header(name, value)
            self.end_headers()
            if send_body:
                self.wfile.write(body)

        def _not_found(self, code: str, message: str, send_body: bool) -> None:
            body = json.dumps({"error": message}).encode()
            self._send(404, body, {"Content-Type": "application/json", "X-Error-Code": code,
                                   "X-Error-Message": message}, send_body)

        def _json(self, value, send_body: bool) -> None:
            self._send(200, json.dumps(value).encode(), {"Content-Type": "application/json"}, send_body)

        def _repo_at(self, repo_id: str, revision: str, send_body: bool) -> Repo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._not_found("RepoNotFound", f"Repository {repo_id} not found", send_body)
                return None
            if revision not in ("main", repo.commit):
                self._not_found("RevisionNotFound", f"Invalid rev id: {revision}", send_body)
                return None
            return repo

        def _answer(self, send_body: bool) -> None:
            hub.log(self.command, self.path)
            url = urlsplit(self.path)
            path, query = unquote(url.path), parse_qs(url.query)
            if path.startswith("/api/models/"):
                rest = path[len("/api/models/"):]
                if send_body and (found := _split_repo(rest, "revision")):
                    repo = self._repo_at(found[0], found[1], send_body)
                    if repo is not None:
                        self._json(repo.info(), send_body)
                    return
                if send_body and (found := _split_repo(rest, "tree")):
                    revision, _, under = found[1].partition("/")
                    repo = self._repo_at(found[0], revision, send_body)
                    if repo is not None:
                        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
                        under = under.strip("/")
                        if under and under not in repo.folders():
                            self._not_found("EntryNotFound", f"{under} does not exist on {revision}", send_body)
                        else:
                            self._json(repo.tree(under, recursive), send_body)
                    return
            elif found := _split_repo(path.lstrip("/"), "resolve"):
                revision, _, file_path = found[1].partition("/")
                repo = self._repo_at(found[0], revision, send_body)
                if repo is None:
                    return
                if file_path not in repo.files:
                    self._not_found("EntryNotFound", f"{file_path} does not exist on {revision}", send_body)
                    return
                self._send(200, repo.files[file_path], {
                    "Content-Type": "application/octet-stream",
                    "X-Repo-Commit": repo.commit,
                    "ETag": f'"{repo.etag(file_path)}"',
                }, send_body)
                return
            self._not_found("NotFound", f"{self.command} {url.path}: not served by this stand-in hub", send_body)

    return Handler
