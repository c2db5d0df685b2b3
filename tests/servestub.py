"""A real OpenAI-compatible streaming server for tests: stdlib http.server in a thread (or as a process), with
controllable delays, so measured TTFT and inter-token latency can be checked against what it injected.

In a test: ``with StubServer(ttft=0.2, itl=0.03) as url: ...``. As a process (a stand-in ``llama-server``):
``python tests/servestub.py --port N [ignored llama-server options]``, behaviour from environment variables
STUB_TTFT, STUB_ITL, STUB_MODE (ok | never-healthy | exit-at-start | die-after:N), STUB_PIDFILE, STUB_SERIALIZE=1
(one request at a time).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class StubConfig:
    def __init__(
        self,
        ttft: float = 0.05,
        itl: float = 0.01,
        *,
        usage: bool = True,
        tokens_per_chunk: int = 1,
        fail_every: int = 0,
        healthy: bool = True,
        die_after: int = 0,
        serialize: bool = False,
        token_text: str = " tok",
    ) -> None:
        self.ttft = ttft
        self.itl = itl
        self.usage = usage
        self.tokens_per_chunk = tokens_per_chunk
        self.fail_every = fail_every  # every Nth completion answers HTTP 500
        self.healthy = healthy
        self.die_after = die_after  # the process exits after N completions started (process mode)
        self.serialize = serialize  # one request at a time: the server saturates at 1/e2e requests/s
        self.token_text = token_text  # what each streamed token decodes to ("": ids with no text)
        self.count = 0
        self.lock = threading.Lock()
        self.busy = threading.Lock()
        self.bodies: list[dict[str, Any]] = []


def make_handler(cfg: StubConfig) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _json(self, status: int, obj: Any) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/health":
                if cfg.healthy:
                    self._json(200, {"status": "ok"})
                else:
                    self._json(503, {"error": {"message": "Loading model"}})
            elif self.path == "/v1/models":
                self._json(200, {"object": "list", "data": [{"id": "stub-model", "object": "model"}]})
            else:
                self._json(404, {"error": "not found"})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            if self.path != "/v1/completions":
                self._json(404, {"error": "not found"})
                return
            with cfg.lock:
                cfg.count += 1
                n = cfg.count
                cfg.bodies.append(body)
            if cfg.die_after and n > cfg.die_after:
                os._exit(3)
            if cfg.fail_every and n % cfg.fail_every == 0:
                self._json(500, {"error": {"message": "stub failure"}})
                return
            if cfg.serialize:
                with cfg.busy:
                    self._stream(body)
            else:
                self._stream(body)

        def _stream(self, body: dict[str, Any]) -> None:
            max_tokens = int(body.get("max_tokens") or 16)
            prompt_tokens = len(str(body.get("prompt", "")).split())
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            time.sleep(cfg.ttft)
            sent = 0
            while sent < max_tokens:
                if sent:
                    time.sleep(cfg.itl * cfg.tokens_per_chunk)
                k = min(cfg.tokens_per_chunk, max_tokens - sent)
                chunk = {"choices": [{"index": 0, "text": cfg.token_text * k, "finish_reason": None}]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
                sent += k
            final: dict[str, Any] = {"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}
            if cfg.usage and (body.get("stream_options") or {}).get("include_usage"):
                final["usage"] = {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": max_tokens,
                    "total_tokens": prompt_tokens + max_tokens,
                    "prompt_tokens_details": {"cached_tokens": prompt_tokens // 2},
                }
            self.wfile.write(f"data: {json.dumps(final)}\n\ndata: [DONE]\n\n".encode())
            self.wfile.flush()
            self.close_connection = True

    return Handler


class StubServer:
    def __init__(self, **kwargs: Any) -> None:
        self.cfg = StubConfig(**kwargs)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(self.cfg))
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> StubServer:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def main(argv: list[str]) -> None:
    port = int(argv[argv.index("--port") + 1])
    mode = os.environ.get("STUB_MODE", "ok")
    if os.environ.get("STUB_PIDFILE"):
        with open(os.environ["STUB_PIDFILE"], "w") as f:
            f.write(str(os.getpid()))
    print("stub server: loading model", flush=True)
    if mode == "exit-at-start":
        print("error: failed to load model 'broken.gguf': not a GGUF file", file=sys.stderr, flush=True)
        sys.exit(1)
    cfg = StubConfig(
        ttft=float(os.environ.get("STUB_TTFT", "0.05")),
        itl=float(os.environ.get("STUB_ITL", "0.01")),
        healthy=mode != "never-healthy",
        die_after=int(mode.split(":")[1]) if mode.startswith("die-after:") else 0,
        serialize=os.environ.get("STUB_SERIALIZE") == "1",
    )
    httpd = ThreadingHTTPServer(("127.0.0.1", port), make_handler(cfg))
    httpd.daemon_threads = True
    print(f"stub server: listening on {port}", flush=True)
    httpd.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
