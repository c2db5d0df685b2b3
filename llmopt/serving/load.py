"""Replaying a trace against a server: Poisson arrivals (open loop) or a fixed number of clients (closed loop)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from llmopt import interrupt
from llmopt.serving.client import Endpoint, RequestRecord, stream_completion
from llmopt.serving.trace import TraceRequest


def payload(req: TraceRequest, model: str | None, extra: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt": req.prompt,
        "max_tokens": req.max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if model:
        body["model"] = model
    body.update(extra)
    return body


class PointRun:
    """One load point. ``run()`` returns the timed requests' records; warm-up requests are sent first, one at a
    time, and not recorded. ``stopped`` says why it ended early (the server died), else None."""

    def __init__(
        self,
        endpoint: Endpoint,
        requests: list[TraceRequest],
        *,
        model: str | None,
        extra: dict[str, Any],
        concurrency: int | None = None,
        timeout: float = 300.0,
        alive: Callable[[], bool] | None = None,
        count_tokens: Callable[[str], int] | None = None,
        on_done: Callable[[RequestRecord], None] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.requests = requests
        self.model = model
        self.extra = extra
        self.concurrency = concurrency
        self.timeout = timeout
        self.alive = alive or (lambda: True)
        self.count_tokens = count_tokens
        self.on_done = on_done
        self.stopped: str | None = None
        self.warmup_errors: list[str] = []
        self.warmup_ttft_ms: list[float] = []  # one request alone on the server: the unloaded TTFT
        self.warmup_tpot_ms: list[float] = []  # and its time per output token

    def _one(self, req: TraceRequest, record: RequestRecord, t0: float) -> None:
        stream_completion(self.endpoint, payload(req, self.model, self.extra), record, t0=t0, timeout=self.timeout)
        if record.ok and record.output_tokens is None and self.count_tokens is not None:
            record.output_tokens = self.count_tokens(record.text)
            record.tokens_from = "tokenizer"
        record.text = record.text[:200]  # kept short: the records are saved per request
        if self.on_done is not None:
            self.on_done(record)

    @staticmethod
    def _record(req: TraceRequest) -> RequestRecord:
        return RequestRecord(
            index=req.index,
            scheduled_s=req.arrival_s,
            sent_s=req.arrival_s,
            prompt_len=req.prompt_len,
            max_tokens=req.max_tokens,
            shared_prefix=req.shared_prefix,
        )

    def _sleep_until(self, when: float) -> bool:
        """Sleep in short steps, watching the server and Ctrl-C; False when the server died."""
        while True:
            interrupt.check()
            if not self.alive():
                return False
            left = when - time.perf_counter()
            if left <= 0:
                return True
            time.sleep(min(left, 0.05))

    def run(self) -> list[RequestRecord]:
        for req in (r for r in self.requests if r.warmup):
            interrupt.check()
            rec = self._record(req)
            stream_completion(self.endpoint, payload(req, self.model, self.extra), rec, t0=0.0, timeout=self.timeout)
            if not rec.ok:
                self.warmup_errors.append(rec.error or "failed")
            else:
                if rec.ttft_ms is not None:
                    self.warmup_ttft_ms.append(rec.ttft_ms)
                if rec.tpot_ms is not None:
                    self.warmup_tpot_ms.append(rec.tpot_ms)
        timed = [r for r in self.requests if not r.warmup]
        records = [self._record(r) for r in timed]
        threads: list[threading.Thread] = []
        t0 = time.perf_counter()
        if self.concurrency:
            lock = threading.Lock()
            queue = list(zip(timed, records, strict=True))

            def client() -> None:
                while self.stopped is None and self.alive():
                    with lock:
                        if not queue:
                            return
                        req, rec = queue.pop(0)
                    self._one(req, rec, t0)

            for _ in range(self.concurrency):
                th = threading.Thread(target=client, daemon=True)
                th.start()
                threads.append(th)
        else:
            for req, rec in zip(timed, records, strict=True):
                if not self._sleep_until(t0 + req.arrival_s):
                    break
                th = threading.Thread(target=self._one, args=(req, rec, t0), daemon=True)
                th.start()
                threads.append(th)
        for th in threads:
            while th.is_alive():
                interrupt.check()
                th.join(0.1)
        if not self.alive():
            self.stopped = "the server exited during the run"
            # requests never sent are not part of what was measured
            return [r for r in records if r.ok or r.error]
        return records
