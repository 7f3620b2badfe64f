"""A stand-in for the few Hugging Face hub endpoints that `HfApi.create_repo` + `HfApi.upload_folder` call, on
127.0.0.1, recording every request. It answers as the hub does (every file as a "regular" upload, so the commit
carries the file contents base64-encoded in its NDJSON body), which lets a test check what would have been
uploaded without any network."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional


class HubStandIn:
    def __init__(self, fail_create: Optional[int] = None):
        self.requests: List[tuple] = []
        self.created: List[dict] = []
        self.commits: List[Dict[str, bytes]] = []
        self.fail_create = fail_create
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def _send(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                stand_in.requests.append(("GET", self.path))
                self._send(404, {"error": "not in this stand-in"})

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                stand_in.requests.append(("POST", self.path))
                if self.path == "/api/repos/create":
                    if stand_in.fail_create:
                        return self._send(stand_in.fail_create, {"error": "Invalid credentials"})
                    req = json.loads(body)
                    stand_in.created.append(req)
                    return self._send(200, {"url": f"{stand_in.endpoint}/{req.get('organization')}/{req['name']}"})
                if self.path == "/api/validate-yaml":
                    return self._send(200, {"errors": [], "warnings": []})
                if "/preupload/" in self.path:
                    files = json.loads(body)["files"]
                    return self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                       "shouldIgnore": False} for f in files]})
                if "/commit/" in self.path:
                    files = {}
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    stand_in.commits.append(files)
                    repo = self.path.split("/api/models/")[1].split("/commit/")[0]
                    return self._send(200, {"commitUrl": f"{stand_in.endpoint}/{repo}/commit/{'0' * 40}",
                                            "commitOid": "0" * 40, "success": True})
                self._send(404, {"error": "not in this stand-in"})

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def env(self) -> dict:
        """Environment for a subprocess that should talk to this stand-in (huggingface-hub reads these at import)."""
        return {"HF_ENDPOINT": self.endpoint, "HF_TOKEN": "hf_stand_in_token", "HF_HUB_OFFLINE": "0",
                "HF_HUB_DISABLE_TELEMETRY": "1"}
