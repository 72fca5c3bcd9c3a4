"""A local stand-in of the Hub API: the real huggingface_hub client talks to it, no network.

``HubStandIn`` is a threaded ``http.server`` on 127.0.0.1 that implements just what
``HfApi.create_repo`` + ``create_branch`` + ``create_commit`` call: POST /api/repos/create, POST /api/validate-yaml
(README metadata), POST /api/models/{repo}/preupload/{rev} (answers ``uploadMode: regular`` for every file, so the
client sends each file inline, base64, in the commit: no LFS / Xet upload path is taken), POST
/api/models/{repo}/commit/{rev} (NDJSON, decoded into the committed files), POST /api/models/{repo}/branch/{rev}
GET /api/models/{repo} (create_repo's existence check after a 403) and GET /api/agent-harnesses. Probes for
``kernels-community`` are answered 404 and kept apart in ``kernel_probes``: bitsandbytes, imported by peft when
transformers' Trainer is imported, asks the Hub for a CPU kernel on CPUs with AVX512-BF16 (not a request of this
package; bitsandbytes falls back to its own kernel). Anything else is answered 404 and recorded as unexpected. It serves at most ``max_requests`` requests and shuts itself down after ``lifetime`` s.

Not a test module: test files import it with ``from hub_standin import HubStandIn``. tests/ has no __init__.py,
so pytest's default ("prepend") import mode puts tests/ on sys.path, as it does for ``from conftest import ...``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

MAX_BODY = 32 * 2**20


class HubStandIn:
    """A bounded fake of the few Hub endpoints a push uses; ``forbid`` = "create" or "commit" answers 403 there."""

    def __init__(self, *, forbid: str | None = None, lifetime: float = 60.0, max_requests: int = 200):
        self.forbid, self.max_requests = forbid, max_requests
        self.requests: list[dict] = []
        self.unexpected: list[str] = []
        self.kernel_probes: list[str] = []
        self.commits: list[dict] = []
        self.created: list[dict] = []
        self.branches: list[str] = []
        self.preuploaded: list[str] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._timer = threading.Timer(lifetime, self._server.shutdown)  # stops itself whatever the test does
        self._timer.daemon = True

    def __enter__(self):
        self._thread.start()
        self._timer.start()
        return self

    def __exit__(self, *exc):
        self._timer.cancel()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # ---- routing ---------------------------------------------------------------------------------------------
    def route(self, method: str, path: str, query: dict, body: bytes) -> tuple[int, dict]:
        parts = path.strip("/").split("/")
        if method == "POST" and path == "/api/repos/create":
            payload = json.loads(body)
            self.created.append(payload)
            if self.forbid == "create":
                return 403, {"error": "You don't have the rights to create a model under this namespace"}
            name = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
            return 200, {"url": f"{self.endpoint}/{name}", "name": name}
        if method == "POST" and path == "/api/validate-yaml":
            return 200, {"errors": [], "warnings": []}
        if method == "GET" and "kernels-community" in parts:
            self.kernel_probes.append(f"{method} {path}")
            return 404, {"error": "Repository not found"}
        if method == "GET" and path == "/api/agent-harnesses":
            # huggingface_hub (≥ 2.4) fetches this registry, best effort, for its user agent in a fresh process.
            return 200, {"standardEnvVars": [], "harnesses": {}}
        if method == "GET" and parts[:2] == ["api", "models"] and len(parts) == 4:
            if self.forbid == "create":
                return 404, {"error": "Repository not found"}
            return 200, {"id": f"{parts[2]}/{parts[3]}", "sha": "0" * 40, "siblings": []}
        if method == "POST" and parts[:2] == ["api", "models"] and len(parts) >= 6:
            repo, action, revision = f"{parts[2]}/{parts[3]}", parts[4], "/".join(parts[5:])
            if action == "preupload":
                files = json.loads(body)["files"]
                self.preuploaded += [f["path"] for f in files]
                return 200, {
                    "files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                }
            if action == "branch":
                self.branches.append(revision)
                return 200, {}
            if action == "commit":
                if self.forbid == "commit":
                    return 403, {"error": "You don't have write access to this repository"}
                lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                files = {}
                for line in lines[1:]:
                    assert line["key"] == "file", f"only inline (regular) files expected, got {line['key']}"
                    assert line["value"]["encoding"] == "base64"
                    files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
                create_pr = query.get("create_pr") == ["1"]
                self.commits.append(
                    {
                        "repo": repo,
                        "revision": revision,
                        "header": lines[0]["value"],
                        "files": files,
                        "create_pr": create_pr,
                    }
                )
                oid = hashlib.sha1(repr(sorted(files)).encode()).hexdigest()
                answer = {"commitUrl": f"{self.endpoint}/{repo}/commit/{oid}", "commitOid": oid}
                if create_pr:
                    answer["pullRequestUrl"] = f"{self.endpoint}/{repo}/discussions/1"
                return 200, answer
        self.unexpected.append(f"{method} {path}")
        return 404, {"error": f"stand-in has no {method} {path}"}

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                        if sum(map(len, chunks)) > MAX_BODY:
                            raise ValueError("body too large")
                    self.rfile.readline()
                    return b"".join(chunks)
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY:
                    raise ValueError("body too large")
                return self.rfile.read(length)

            def _serve(self, method: str):
                url = urlsplit(self.path)
                body = self._body() if method == "POST" else b""
                with hub._lock:
                    hub.requests.append(
                        {"method": method, "path": url.path, "authorization": self.headers.get("Authorization")}
                    )
                    if len(hub.requests) > hub.max_requests:
                        status, answer = 429, {"error": "stand-in request limit reached"}
                    else:
                        status, answer = hub.route(method, url.path, parse_qs(url.query), body)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._serve("GET")

            def do_POST(self):
                self._serve("POST")

        return Handler
