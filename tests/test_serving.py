"""serve-bench's load generator and metrics against a real streaming server (tests/servestub.py) whose delays
are known, so the measured TTFT / inter-token latency can be checked against what it injected."""

from __future__ import annotations

import itertools
import os
import statistics
from pathlib import Path

import pytest

from llmopt.errors import InputError
from llmopt.serving.bench import Target, serve_bench
from llmopt.serving.metrics import parse_slo
from llmopt.serving.servers import ServerOptions, transformers_serve_flags, vllm_spec
from llmopt.serving.trace import LengthDist, TraceSpec, build_trace
from llmopt.stats import percentile
from tests.servestub import StubServer


def _url_bench(url: str, **trace: object) -> object:
    spec = TraceSpec(**{"rates": [4.0], "requests": 12, "warmup": 1, "output_len": LengthDist.parse(8, "x"), **trace})
    return serve_bench([Target(role="model", model=None, url=url)], spec)


def test_measured_ttft_and_itl_match_the_injected_delays() -> None:
    with StubServer(ttft=0.15, itl=0.02) as stub:
        result = _url_bench(stub.url)
    point = result.models[0].points[0]
    assert point.ok == 12 and point.errors == 0 and not point.saturated
    # what the stand-in slept, plus a little for the HTTP round trip and thread start-up on a busy machine
    assert 150 <= point.ttft_ms.p50 <= 150 + 60
    assert 20 <= point.itl_ms.p50 <= 20 + 12
    assert 20 <= point.tpot_ms.p50 <= 20 + 12
    assert 150 + 7 * 20 <= point.e2e_ms.p50 <= 150 + 7 * 20 + 100
    assert point.tokens_from == "usage"
    assert point.prefix_cache_hit == pytest.approx(0.5, abs=0.05)  # the stand-in reports half its prompt cached
    # 12 timed requests of 8 tokens: output tokens/s counts the server's tokens over the run's duration
    assert point.output_tokens_per_s == pytest.approx(96 / point.duration_s)
    # warm-up requests were sent but are not part of the numbers
    assert len(stub.cfg.bodies) == 13
    body = stub.cfg.bodies[-1]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["model"] == "stub-model"  # from /v1/models
    assert "ignore_eos" not in body  # not sent to a --url server unless asked


def test_token_counts_come_from_usage_not_from_chunks() -> None:
    """A server that packs 4 tokens into each streamed chunk: ITL (chunk gaps) is 4x the per-token time, and
    time per output token (from the usage count) is the per-token time."""
    with StubServer(ttft=0.05, itl=0.02, tokens_per_chunk=4) as stub:
        result = _url_bench(stub.url, output_len=LengthDist.parse(16, "x"))
    point = result.models[0].points[0]
    assert point.output_tokens_per_s == pytest.approx(12 * 16 / point.duration_s)
    assert 80 <= point.itl_ms.p50 <= 80 + 15
    # 15 tokens after the first arrive in 3 more chunks, 80 ms apart: 240 / 15 = 16 ms per token
    assert 16 <= point.tpot_ms.p50 <= 16 + 8


def test_without_usage_the_tokenizer_counts_and_never_whitespace(assets: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    with StubServer(ttft=0.01, itl=0.005, usage=False) as stub:
        counted = serve_bench(
            [Target(role="model", model=None, url=stub.url)],
            TraceSpec(rates=[8.0], requests=4, warmup=0, output_len=LengthDist.parse(8, "x")),
            tokenizer=str(assets["model"]),
        )
        unknown = _url_bench(stub.url)
    tok = AutoTokenizer.from_pretrained(str(assets["model"]))
    point = counted.models[0].points[0]
    assert point.tokens_from == "tokenizer"
    per_request = len(tok.encode(" tok" * 8, add_special_tokens=False))
    assert per_request != 8 * 2  # not words, not chunks: the tokenizer's count
    assert point.output_tokens_per_s == pytest.approx(4 * per_request / point.duration_s)
    # no usage and no tokenizer: tokens/s is unknown, not guessed from whitespace
    assert unknown.models[0].points[0].output_tokens_per_s is None
    assert unknown.models[0].points[0].tokens_from is None


def test_trace_is_poisson_seeded_and_shares_a_prefix(assets: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(assets["model"]))
    spec = TraceSpec(
        rates=[5.0],
        requests=400,
        warmup=3,
        prompt_len=LengthDist.parse("50-150", "x"),
        prefix_len=64,
        prefix_share=0.5,
        seed=7,
    )
    a = build_trace(spec, "rate", 5.0, tok)
    assert [r.prompt for r in a] == [r.prompt for r in build_trace(spec, "rate", 5.0, tok)]
    assert [r.prompt for r in a] != [
        r.prompt for r in build_trace(spec.model_copy(update={"seed": 8}), "rate", 5.0, tok)
    ]
    warm, timed = a[:3], a[3:]
    assert all(r.warmup for r in warm) and not any(r.warmup for r in timed)
    gaps = [b.arrival_s - x.arrival_s for x, b in itertools.pairwise(timed)]
    assert statistics.fmean(gaps) == pytest.approx(0.2, rel=0.15)
    # exponential gaps: standard deviation equals the mean
    assert statistics.stdev(gaps) == pytest.approx(0.2, rel=0.2)
    shared = [r for r in timed if r.shared_prefix]
    assert 0.4 < len(shared) / len(timed) < 0.6
    prefix = shared[0].prompt.split("\n\n")[0]
    assert all(r.prompt.startswith(prefix + "\n\n") for r in shared)
    assert not any(r.prompt.startswith(prefix) for r in timed if not r.shared_prefix)
    # prompt lengths are tokens of the model's tokenizer, not words
    for r in timed[:20]:
        assert len(tok.encode(r.prompt, add_special_tokens=False)) == pytest.approx(r.prompt_len, rel=0.1)


def test_a_server_that_cannot_keep_up_is_called_saturated_without_percentiles() -> None:
    """One request at a time, 0.25 s each: it keeps up with 1 req/s, not with 20 req/s."""
    with StubServer(ttft=0.05, itl=0.025, serialize=True) as stub:
        result = serve_bench(
            [Target(role="model", model=None, url=stub.url)],
            TraceSpec(rates=[1.0, 20.0], requests=16, warmup=0, output_len=LengthDist.parse(8, "x")),
        )
    low, high = result.models[0].points
    assert not low.saturated and low.ttft_ms is not None
    assert high.saturated and "queueing" in (high.saturation_note or "")
    assert high.ttft_ms is None and high.e2e_ms is None  # not a meaningful percentile
    # one at a time it completes 4 req/s at 20 offered, against ~1 at 1: still growing, so no capacity is claimed
    assert result.models[0].saturation == {
        "saturated_at": 20.0,
        "sustained_up_to": 1.0,
        "note": high.saturation_note,
        "capacity_from": None,
        "capacity_requests_per_s": None,
        "capacity_tokens_per_s": None,
        "at_capacity": [],
    }


def test_goodput_and_the_slo_gate() -> None:
    with StubServer(ttft=0.1, itl=0.01) as stub:
        tight = serve_bench(
            [Target(role="model", model=None, url=stub.url)],
            TraceSpec(rates=[4.0], requests=8, warmup=0),
            slo=parse_slo("ttft_p95=50ms"),
        )
        loose = serve_bench(
            [Target(role="model", model=None, url=stub.url)],
            TraceSpec(rates=[4.0], requests=8, warmup=0),
            slo=parse_slo("ttft_p95=0.5s,itl_p95_ms=50"),
        )
    t, lo = tight.models[0].points[0], loose.models[0].points[0]
    assert t.goodput_per_s == 0 and t.slo_passed is False and tight.gate["passed"] is False
    # good requests over the measured window, but never above the offered rate (8 requests at 4 req/s: 2 s)
    assert lo.good_fraction == 1 and lo.goodput_per_s == pytest.approx(8 / max(lo.duration_s, 2.0))
    assert lo.goodput_per_s <= 4.0 + 1e-9
    assert loose.gate["passed"] is True
    assert {c["name"] for c in loose.gate["checks"]} == {"ttft_p95_ms", "itl_p95_ms"}


def test_failed_requests_are_counted_with_their_error() -> None:
    with StubServer(ttft=0.01, itl=0.005, fail_every=4) as stub:
        result = _url_bench(stub.url, warmup=0)
    point = result.models[0].points[0]
    assert point.errors == 3 and point.ok == 9
    assert any("HTTP 500" in e for e in point.error_samples)
    assert point.saturated  # a quarter failed: not a load the server serves


def test_tokens_that_decode_to_no_text_are_named_as_the_cause() -> None:
    """On the GPU machine a random model's generated ids decoded to nothing (its tokenizer stopped at 4,096 words):
    every request failed with "the stream ended without any generated text". The error now says the server did
    generate, by its own count."""
    with StubServer(ttft=0.01, itl=0.005, token_text="") as stub:
        result = _url_bench(stub.url, warmup=0)
    point = result.models[0].points[0]
    assert point.ok == 0 and point.errors == 12
    assert any("counted 8 generated tokens but streamed no text" in e for e in point.error_samples)


def test_fixed_concurrency_keeps_that_many_in_flight() -> None:
    with StubServer(ttft=0.05, itl=0.01) as stub:
        result = serve_bench(
            [Target(role="model", model=None, url=stub.url)],
            TraceSpec(concurrency=3, requests=12, warmup=0, output_len=LengthDist.parse(5, "x")),
        )
    point = result.models[0].points[0]
    assert point.mode == "concurrency" and point.ok == 12
    # 4 rounds of 3 requests, each ~0.05 + 4*0.01 s
    assert 0.35 <= point.duration_s <= 0.35 + 0.4


def test_slo_parsing() -> None:
    slo = parse_slo("ttft_p95=500ms, itl_p95_ms=50,e2e_p99=2s,min_goodput=1.5,at_rate=4")
    assert slo is not None
    assert slo.limits == {"ttft_p95": 500, "itl_p95": 50, "e2e_p99": 2000}
    assert slo.min_goodput == 1.5 and slo.at_rate == 4
    assert slo.request_limits() == {"ttft": 500, "tpot": 50, "e2e": 2000}
    for bad in ("ttft=500", "ttft_p95=fast", "ttft_p42=5ms", "min_goodput=x", "ttft_p95"):
        with pytest.raises(InputError):
            parse_slo(bad)


def test_percentile_interpolates_like_numpy() -> None:
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([10], 99) == 10
    assert percentile(list(range(101)), 95) == 95


def test_length_distributions() -> None:
    import random

    rng = random.Random(0)
    assert LengthDist.parse("128", "x").sample(rng) == 128
    assert all(64 <= LengthDist.parse("64-256", "x").sample(rng) <= 256 for _ in range(100))
    assert statistics.fmean(LengthDist.parse("normal:100,10", "x").sample(rng) for _ in range(500)) == (
        pytest.approx(100, rel=0.05)
    )
    for bad in ("0", "256-64", "lots", "normal:1"):
        with pytest.raises(InputError):
            LengthDist.parse(bad, "--prompt-len")


def test_vllm_command_line_follows_its_documented_cli(tmp_path: Path) -> None:
    spec = vllm_spec("org/model", 8123, ServerOptions(prefix_caching=False, context=4096), vllm="/opt/bin/vllm")
    assert spec.argv == [
        "/opt/bin/vllm",
        "serve",
        "org/model",
        "--host",
        "127.0.0.1",
        "--port",
        "8123",
        "--served-model-name",
        "model",
        "--max-model-len",
        "4096",
        "--no-enable-prefix-caching",
    ]
    assert spec.model_name == "model" and spec.health_path == "/health"
    on = vllm_spec("m", 1, ServerOptions(prefix_caching=True), vllm="vllm")
    assert "--enable-prefix-caching" in on.argv


def test_transformers_serve_continuous_batching_flag_per_version() -> None:
    assert transformers_serve_flags("  --continuous-batching / --no-continuous-batching")["continuous_batching"] == (
        "--continuous-batching"
    )  # 5.x (typer)
    assert transformers_serve_flags("  --continuous_batching  Whether to use")["continuous_batching"] == (
        "--continuous_batching"
    )  # 4.5x (argparse)
    assert transformers_serve_flags("usage: transformers serve")["continuous_batching"] is None


@pytest.mark.parametrize("how", ["normal", "error", "ctrl-c"])
def test_a_started_server_is_stopped_on_every_way_out(tmp_path: Path, how: str) -> None:
    """In this process (alive throughout, so only llmopt's own stopping can end the server)."""
    import sys

    from llmopt.serving.servers import RunningServer, ServerSpec, free_port

    port = free_port()
    stub = Path(__file__).resolve().parent / "servestub.py"
    spec = ServerSpec(kind="llama.cpp", argv=[sys.executable, str(stub), "--port", str(port)], port=port)
    server = RunningServer(spec, tmp_path / "server.log", startup_timeout=60)
    raised = {"normal": None, "error": RuntimeError("boom"), "ctrl-c": KeyboardInterrupt()}[how]
    try:
        with server:
            assert server.alive() and server.proc is not None
            pid = server.proc.pid
            if raised is not None:
                raise raised
    except (RuntimeError, KeyboardInterrupt):
        pass
    assert server.proc.poll() is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # nothing of its process group is left


def test_saturation_in_a_run_too_short_for_a_trend() -> None:
    """Four requests arriving within ~0.2 s at a server doing one at a time (0.4 s each): each waits for all
    before it, far longer than the warm-up request alone and than the arrival window. A server that batches them
    is not saturated by the same trace."""
    spec = TraceSpec(rates=[20.0], requests=4, warmup=1, output_len=LengthDist.parse(8, "x"))
    with StubServer(ttft=0.05, itl=0.05, serialize=True) as stub:
        serial = serve_bench([Target(role="model", model=None, url=stub.url)], spec).models[0].points[0]
    with StubServer(ttft=0.05, itl=0.05) as stub:
        batched = serve_bench([Target(role="model", model=None, url=stub.url)], spec).models[0].points[0]
    assert serial.saturated and "against" in (serial.saturation_note or ""), serial
    assert not batched.saturated and batched.ttft_ms is not None
    assert 50 <= batched.unloaded_ttft_ms <= 50 + 60


def test_transformers_serve_gets_float32_on_a_cpu(assets: dict[str, Path]) -> None:
    """The checkpoint is float16; served as such on a CPU, its matmuls are emulated (8 s to a first token)."""
    from llmopt.serving.servers import transformers_spec

    help_text = "--continuous-batching --device TEXT --dtype TEXT"
    cpu = transformers_spec(str(assets["model"]), 1, ServerOptions(device="cpu"), help_text=help_text)
    assert cpu.argv[cpu.argv.index("--dtype") + 1] == "float32"
    assert cpu.argv[cpu.argv.index("--device") + 1] == "cpu" and "--continuous-batching" in cpu.argv
    gpu = transformers_spec(str(assets["model"]), 1, ServerOptions(device="cuda:0"), help_text=help_text)
    assert "--dtype" not in gpu.argv
    own = transformers_spec(str(assets["model"]), 1, ServerOptions(device="cpu", dtype="bfloat16"), help_text=help_text)
    assert own.argv[own.argv.index("--dtype") + 1] == "bfloat16"


def _llama_server() -> Path:
    from llmopt.errors import BackendUnavailableError
    from llmopt.serving.servers import llama_server_binary

    try:
        return llama_server_binary()
    except BackendUnavailableError:
        pytest.skip("llama-server is not built here (scripts/build_llamacpp.py, or LLMOPT_LLAMA_SERVER)")


@pytest.mark.e2e
def test_real_llama_server_on_a_small_gguf(assets: dict[str, Path], tmp_path: Path) -> None:
    """SmolLM2 cut to 2 layers, as a GGUF artifact, through the real llama-server: every request streams exactly
    max_tokens tokens (ignore_eos), counted by the server; the shared prefix is served from its cache."""
    _llama_server()
    from llmopt.api import quantize
    from llmopt.serving.servers import ServerOptions
    from tests.helpers import first_layers

    small = first_layers(assets["model"], tmp_path / "small", 2)
    art = quantize(str(small), "gguf", tmp_path / "q8", options={"quant_type": "q8_0"})
    spec = TraceSpec(
        rates=[4.0],
        requests=6,
        warmup=1,
        prompt_len=LengthDist.parse(32, "x"),
        output_len=LengthDist.parse(12, "x"),
        prefix_len=200,
        prefix_share=1.0,
    )
    result = serve_bench(
        [Target(role="model", model=str(art.path), url=None)],
        spec,
        server_options=ServerOptions(threads=2, parallel=2, context=512, prefix_caching=True),
    )
    model = result.models[0]
    point = model.points[0]
    assert model.server.kind == "llama.cpp" and point.ok == 6 and point.errors == 0
    assert result.tokenizer == str(art.path)  # the artifact folder's own tokenizer
    assert point.tokens_from == "usage"
    assert point.output_tokens_per_s == pytest.approx(6 * 12 / point.duration_s)
    assert point.ttft_ms is not None and point.ttft_ms.p50 > 0
    assert point.prefix_cache_hit is not None and point.prefix_cache_hit > 0.5


def test_real_llama_server_refuses_a_broken_gguf(tmp_path: Path) -> None:
    """A file llama.cpp cannot load: the server's own words and exit 4, no server left."""
    _llama_server()
    from llmopt.errors import BackendUnavailableError

    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    with pytest.raises(BackendUnavailableError) as info:
        serve_bench(
            [Target(role="model", model=str(bad), url=None)],
            TraceSpec(rates=[1.0], requests=1),
            server_options=ServerOptions(startup_timeout=60),
        )
    assert "stopped (exit code" in str(info.value) and "before it was ready" in str(info.value)


def test_llama_server_is_found_in_a_build_that_is_not_the_active_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """scripts/build_llamacpp.py --no-install builds the tools without making them the active build."""
    from llmopt.backends.gguf_toolchain import installed_llama_cpp_version
    from llmopt.serving.servers import llama_server_binary

    version = installed_llama_cpp_version()
    if version is None:
        pytest.skip("llama-cpp-python is not installed")
    root = tmp_path / version
    (root / "converter").mkdir(parents=True)
    (root / "converter" / "convert_hf_to_gguf.py").write_text("")
    (root / "llmopt-llamacpp.json").write_text('{"active": null, "builds": {}}')
    tool = root / "bin" / "abc123" / "llama-server"
    tool.parent.mkdir(parents=True)
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    monkeypatch.setenv("LLMOPT_LLAMACPP_DIR", str(tmp_path))
    monkeypatch.delenv("LLMOPT_LLAMA_SERVER", raising=False)
    assert llama_server_binary() == tool


def test_goodput_of_a_burst_never_reads_above_the_offered_rate() -> None:
    """Four Poisson arrivals at 0.5 req/s that happen to land within 1.6 s: good requests over that window would be
    2.5 req/s "at 0.5 req/s" (a hostile tester's min_goodput gate passed on it). Goodput is capped by the offered
    rate times the share of good requests; a concurrency point keeps its measured window."""
    from llmopt.serving.metrics import PointResult, RequestLatency, apply_slo

    def point(mode: str, value: float) -> PointResult:
        return PointResult(
            mode=mode, value=value, requests=4, ok=4, errors=0, duration_s=1.6, requests_per_s=2.5,
            output_tokens_per_s=10.0, prompt_tokens_per_s=None, tokens_from="usage", ttft_ms=None, itl_ms=None,
            tpot_ms=None, e2e_ms=None,
            latencies=[RequestLatency(ok=True, ttft_ms=t, e2e_ms=2 * t) for t in (100.0, 120.0, 900.0, 130.0)],
        )  # fmt: skip

    slo = parse_slo("ttft_p95=500ms,min_goodput=2")
    assert slo is not None
    burst = point("rate", 0.5)
    apply_slo(burst, None, slo)
    assert burst.good_fraction == 0.75 and burst.goodput_per_s == pytest.approx(0.375)  # 0.5 x 3/4
    assert not next(c for c in burst.slo_checks if c.name == "min_goodput").passed
    clients = point("concurrency", 2)
    apply_slo(clients, None, slo)
    assert clients.goodput_per_s == pytest.approx(3 / 1.6)


def test_llama_server_is_placed_where_the_evaluation_runs() -> None:
    """A run on cuda:0 serves its GGUF with every layer on that GPU (llama-server's own default may keep them on
    the CPU); cpu puts none there; auto, or placement arguments of the user's own, add nothing."""
    from llmopt.serving.servers import llama_cpp_placement

    assert llama_cpp_placement("cuda:0", []) == ["-ngl", "999", "--device", "CUDA0"]
    assert llama_cpp_placement("cuda:3", ["--no-mmap"]) == ["-ngl", "999", "--device", "CUDA3"]
    assert llama_cpp_placement("cuda", []) == ["-ngl", "999"]
    assert llama_cpp_placement("cpu", []) == ["-ngl", "0"]
    assert llama_cpp_placement("auto", []) == []
    assert llama_cpp_placement("cuda:0", ["-ngl", "20"]) == []
    assert llama_cpp_placement("cuda:0", ["--n-gpu-layers=20"]) == []
    assert llama_cpp_placement("cpu", ["--device", "none"]) == []


def test_the_run_passes_its_device_to_the_server(tmp_path: Path) -> None:
    from llmopt.serving.measure import server_options
    from llmopt.specs import ServingSpec

    spec = ServingSpec(rates=[1.0])
    assert server_options(spec, "cuda:1").device == "cuda:1"
    assert server_options(spec, "cpu").device == "cpu"
    assert server_options(spec, None).device == "auto"
    assert server_options(spec, "cuda:0,1").device == "auto"  # a split model: the server's own default


@pytest.mark.parametrize(
    ("device", "code"),
    [("cuda:abc", 2), ("cuda:-1", 2), ("mps", 2), ("", 2), ("cuda: 0", 2)],
)
def test_serve_bench_refuses_a_device_it_does_not_know(tmp_path: Path, device: str, code: int) -> None:
    """Was: any unknown --device silently meant 'auto' (CPU was served when CPU, in capitals, was asked)."""
    from tests.helpers import run_cli

    r = run_cli(["serve-bench", str(tmp_path / "m.gguf"), "--device", device, "--rates", "1"], timeout=120)
    assert r.returncode == code, r.stderr
    assert "not a device llmopt knows" in r.stderr and "Traceback" not in r.stderr


def test_serve_bench_device_is_normalized_and_a_missing_gpu_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import llmopt.placement as placement
    from llmopt.errors import BackendUnavailableError
    from llmopt.serving.servers import check_server_device

    assert check_server_device(" CPU ") == "cpu"
    assert check_server_device("Auto") == "auto"
    monkeypatch.setattr(placement, "visible_gpu_count", lambda: 0)
    with pytest.raises(BackendUnavailableError):
        check_server_device("cuda:0")
    with pytest.raises(InputError, match="several"):  # bad input on a machine without GPUs too
        check_server_device("cuda:0,1")
    monkeypatch.setattr(placement, "visible_gpu_count", lambda: 2)
    assert check_server_device("CUDA:1") == "cuda:1"
    with pytest.raises(InputError, match="several"):
        check_server_device("cuda:0,1")
    with pytest.raises(InputError, match="only 2 GPU"):
        check_server_device("cuda:2")


def test_a_run_places_its_servers_on_its_device_not_its_label(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`llmopt run` handed the machine's label ('cpu (x86_64)') to the server as its device: transformers serve
    died with `--device cpu (x86_64)` and llama-server got no placement. The label goes to the report, the device
    to the server."""
    import llmopt.serving.measure as measure
    from llmopt.specs import ServingSpec

    seen: dict[str, object] = {}

    class Stop(Exception):
        pass

    def fake_serve_bench(targets: object, trace: object, **kwargs: object) -> object:
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(measure, "serve_bench", fake_serve_bench)
    with pytest.raises(Stop):
        measure.serve_model(
            tmp_path, ServingSpec(rates=[1.0]), work_dir=tmp_path, device="cpu (x86_64)", server_device="cpu"
        )
    assert seen["server_options"].device == "cpu"  # type: ignore[attr-defined]
