"""Serving one model under load for ``llmopt run`` (the recipe's ``evaluation.serving``): serve-bench's server and
trace for a single model, its result as the typed ``ServingReport`` the run report and the manifest carry."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from llmopt.results import ServingReport
from llmopt.serving.bench import Target, serve_bench
from llmopt.serving.servers import ServerOptions
from llmopt.specs import ServingSpec


def server_options(spec: ServingSpec, device: str | None = None) -> ServerOptions:
    """The server's options from the recipe's ``evaluation.serving``; ``device`` (the evaluation's) places the model:
    transformers serve's --device, llama.cpp's GPU layers."""
    return ServerOptions(
        device=device if device and "," not in device else "auto",
        port=spec.port,
        threads=spec.threads,
        parallel=spec.parallel,
        context=spec.context,
        prefix_caching=spec.prefix_caching,
        startup_timeout=spec.startup_timeout,
        extra_args=list(spec.server_args),
    )


def serve_model(
    model: str | Path,
    spec: ServingSpec,
    *,
    role: str = "model",
    tokenizer: str | None = None,
    work_dir: Path,
    device: str | None = None,
    server_device: str | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> ServingReport:
    """Start ``model``'s server (llama.cpp for GGUF, transformers serve for a folder, or ``spec.server``), replay
    ``spec``'s trace at each rate, stop it. Server log and per-request records go to ``work_dir``.

    Raises what serve-bench raises before anything is measured (the server cannot be started or cannot load the
    model: exit 4 or 2; every request failed: exit 4). A server that dies mid-run returns the points measured
    until then with ``failed`` set. The same ``spec.seed`` gives every model the same prompts at the same times.
    ``device`` is the machine's label the report records; ``server_device`` (``cpu``, ``cuda:0``) places the model
    in the server.
    """
    result = serve_bench(
        [Target(role=role, model=str(model), url=None, server=spec.server)],
        spec.trace(),
        server_options=server_options(spec, server_device),
        tokenizer=tokenizer,
        out_dir=work_dir,
        ignore_eos=spec.ignore_eos,
        request_timeout=spec.request_timeout,
        gpu_hourly_cost=spec.gpu_hourly_cost,
        log=log,
    )
    measured = result.models[0]
    return ServingReport(
        model=str(model),
        spec=spec.model_dump(mode="json"),
        server=json.loads(measured.server.model_dump_json()),
        machine=result.machine,
        device=device,
        tokenizer=result.tokenizer,
        created=result.created,
        points=measured.points,
        saturation=measured.saturation,
        failed=measured.failed,
    )
