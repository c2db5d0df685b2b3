"""A streaming OpenAI-compatible ``/v1/completions`` client (stdlib only) that timestamps every chunk.

Streaming is what makes TTFT real: the first content chunk's arrival. Token counts come from the server's
``usage`` (asked for with ``stream_options.include_usage``), else from a tokenizer over the generated text.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.parse
from typing import Any

from pydantic import BaseModel

from llmopt.errors import BackendUnavailableError, InputError


class RequestRecord(BaseModel):
    """One request as measured (times in seconds from the timed phase's start, latencies in ms)."""

    index: int
    scheduled_s: float
    sent_s: float
    prompt_len: int
    max_tokens: int
    shared_prefix: bool
    ok: bool = False
    error: str | None = None
    ttft_ms: float | None = None
    e2e_ms: float | None = None
    chunk_gaps_ms: list[float] = []  # gaps between content chunks after the first
    chunks: int = 0
    prompt_tokens: int | None = None
    cached_prompt_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens (prefix cache hits)
    output_tokens: int | None = None
    tokens_from: str | None = None  # "usage" | "tokenizer" | None (unknown)
    text: str = ""

    @property
    def tpot_ms(self) -> float | None:
        """Mean time per output token after the first (a server may pack several tokens into one chunk)."""
        if self.e2e_ms is None or self.ttft_ms is None or not self.output_tokens or self.output_tokens < 2:
            return None
        return (self.e2e_ms - self.ttft_ms) / (self.output_tokens - 1)


class Endpoint(BaseModel):
    scheme: str
    host: str
    port: int
    base_path: str  # up to and without /v1/...

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        u = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
        if u.scheme not in ("http", "https") or not u.hostname:
            raise InputError(f"--url {url!r} is not an http(s) URL.", "E.g. --url http://127.0.0.1:8000")
        try:
            port = u.port or (443 if u.scheme == "https" else 80)
        except ValueError:
            raise InputError(f"--url {url!r} has an invalid port.", "E.g. --url http://127.0.0.1:8000") from None
        path = u.path.rstrip("/")
        for tail in ("/v1/completions", "/v1/chat/completions", "/v1"):
            if path.endswith(tail):
                path = path[: -len(tail)]
                break
        return cls(scheme=u.scheme, host=u.hostname, port=port, base_path=path)

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}{self.base_path}"

    def connection(self, timeout: float) -> http.client.HTTPConnection:
        conn_cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return conn_cls(self.host, self.port, timeout=timeout)

    def get_json(self, path: str, timeout: float = 5.0) -> tuple[int, Any]:
        conn = self.connection(timeout)
        try:
            conn.request("GET", self.base_path + path)
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
        try:
            return resp.status, json.loads(body or b"null")
        except ValueError:
            return resp.status, None


def check_reachable(endpoint: Endpoint, timeout: float = 5.0) -> None:
    """Fail early, with the exit code for an unusable runtime, when nothing answers at the URL."""
    try:
        endpoint.get_json("/v1/models", timeout)
    except (OSError, http.client.HTTPException) as exc:
        raise BackendUnavailableError(
            f"nothing answers at {endpoint} ({exc.__class__.__name__}: {exc}).",
            "Start the server first (or leave out --url to let llmopt start one), and check host and port.",
        ) from None


def served_model(endpoint: Endpoint) -> str | None:
    """The first model id the server lists, used as the request's "model" when none was given."""
    try:
        status, data = endpoint.get_json("/v1/models")
    except (OSError, http.client.HTTPException):
        return None
    if status == 200 and isinstance(data, dict) and isinstance(data.get("data"), list) and data["data"]:
        first = data["data"][0]
        return str(first.get("id")) if isinstance(first, dict) and first.get("id") else None
    return None


def stream_completion(
    endpoint: Endpoint,
    payload: dict[str, Any],
    record: RequestRecord,
    *,
    t0: float,
    timeout: float,
) -> RequestRecord:
    """POST ``payload`` (stream=True) and fill ``record``'s timings from the server-sent events. Never raises
    for a failed request: the error lands in ``record.error``."""
    body = json.dumps(payload).encode()
    conn = endpoint.connection(timeout)
    start = time.perf_counter()
    record.sent_s = start - t0
    last: float | None = None
    parts: list[str] = []
    try:
        conn.request(
            "POST",
            endpoint.base_path + "/v1/completions",
            body=body,
            headers={"Content-Type": "application/json", "Accept": "text/event-stream"},
        )
        resp = conn.getresponse()
        if resp.status != 200:
            detail = resp.read(400).decode("utf-8", "replace").strip().replace("\n", " ")
            record.error = f"HTTP {resp.status}: {detail}"
            return record
        done = False
        while not done:
            raw = resp.readline()
            if not raw:
                break
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            try:
                event = json.loads(data)
            except ValueError:
                continue
            now = time.perf_counter()
            if isinstance(event, dict) and event.get("error"):
                err = event["error"]
                record.error = f"server error: {err.get('message', err) if isinstance(err, dict) else err}"
                return record
            usage = event.get("usage") if isinstance(event, dict) else None
            if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
                record.output_tokens = int(usage["completion_tokens"])
                record.prompt_tokens = usage.get("prompt_tokens")
                details = usage.get("prompt_tokens_details")
                if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
                    record.cached_prompt_tokens = details["cached_tokens"]
                record.tokens_from = "usage"
            choices = event.get("choices") if isinstance(event, dict) else None
            text = ""
            if isinstance(choices, list) and choices and isinstance(choices[0], dict):
                text = choices[0].get("text") or ""
            if text:
                if last is None:
                    record.ttft_ms = (now - start) * 1000
                else:
                    record.chunk_gaps_ms.append((now - last) * 1000)
                last = now
                record.chunks += 1
                parts.append(text)
        end = time.perf_counter()
        record.text = "".join(parts)
        if record.ttft_ms is None:
            record.error = "the stream ended without any generated text"
            if record.output_tokens:
                record.error = (
                    f"the server counted {record.output_tokens} generated tokens but streamed no text for them "
                    "(they decode to nothing, e.g. ids a random-weight model's tokenizer lacks), so no latency "
                    "can be timed"
                )
            return record
        if not done and record.tokens_from is None:
            record.error = "the stream was cut before it finished (no [DONE], no usage)"
            return record
        record.e2e_ms = (end - start) * 1000
        record.ok = True
    except (TimeoutError, OSError, http.client.HTTPException) as exc:
        record.error = f"{exc.__class__.__name__}: {exc}"
    finally:
        conn.close()
    return record
