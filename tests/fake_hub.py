"""A fake Hugging Face Hub on 127.0.0.1 for tests: point HF_ENDPOINT at `FakeHub.url`.

It answers the few routes huggingface_hub uses to find and fetch files: model info (with the file list),
the repo tree, and HEAD/GET of `/{repo}/resolve/{revision}/{file}` with the commit and ETag headers.
Every request is logged in `requests` so tests can tell a download from a cache hit.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


class FakeHub:
    def __init__(self, repos: dict[str, dict[str, bytes]]):
        self.repos = repos
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                hub.handle(self, head=True)

            def do_GET(self):
                hub.handle(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def commit(self, repo: str) -> str:
        return hashlib.sha1(repo.encode()).hexdigest()

    def downloads(self, name: str) -> int:
        """How many GETs fetched the bytes of a file called `name`."""
        return sum(1 for m, p in self.requests if m == "GET" and "/resolve/" in p and p.endswith("/" + name))

    def handle(self, req: BaseHTTPRequestHandler, head: bool):
        path = unquote(urlparse(req.path).path)
        self.requests.append(("HEAD" if head else "GET", path))
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/[^/]+)?", path):
            return self.info(req, m.group(1))
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/[^/]+(?:/.*)?", path):
            return self.tree(req, m.group(1))
        if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/[^/]+/(.+)", path):
            return self.file(req, m.group(1), m.group(2), head)
        self.send(req, 404, b"{}", {"X-Error-Code": "EntryNotFound"})

    def send(self, req, code: int, body: bytes, headers: dict | None = None, head: bool = False):
        req.send_response(code)
        for k, v in (headers or {}).items():
            req.send_header(k, v)
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        if not head:
            req.wfile.write(body)

    def missing_repo(self, req, head=False):
        self.send(req, 404, b'{"error": "Repository not found"}',
                  {"X-Error-Code": "RepoNotFound", "Content-Type": "application/json"}, head)

    def info(self, req, repo: str):
        if repo not in self.repos:
            return self.missing_repo(req)
        body = {"id": repo, "modelId": repo, "sha": self.commit(repo), "private": False,
                "siblings": [{"rfilename": f} for f in sorted(self.repos[repo])]}
        self.send(req, 200, json.dumps(body).encode(), {"Content-Type": "application/json"})

    def tree(self, req, repo: str):
        if repo not in self.repos:
            return self.missing_repo(req)
        body = [{"type": "file", "path": f, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                for f, d in sorted(self.repos[repo].items())]
        self.send(req, 200, json.dumps(body).encode(), {"Content-Type": "application/json"})

    def file(self, req, repo: str, name: str, head: bool):
        if repo not in self.repos:
            return self.missing_repo(req, head)
        data = self.repos[repo].get(name)
        if data is None:
            return self.send(req, 404, b"{}", {"X-Error-Code": "EntryNotFound"}, head)
        headers = {"X-Repo-Commit": self.commit(repo), "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                   "Content-Type": "application/octet-stream"}
        start = 0
        if (rng := req.headers.get("Range")) and (m := re.match(r"bytes=(\d+)-", rng)):
            start = int(m.group(1))
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        self.send(req, 206 if start else 200, data[start:], headers, head)
