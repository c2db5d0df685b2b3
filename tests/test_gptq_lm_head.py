"""GPTQ ``quantize_lm_head``: the option, untying a tied head, what the checkpoint and manifest say, AWQ's refusal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from llmopt.backends.awq import AWQBackend
from llmopt.backends.base import QuantizeInputs, describe_backend, format_card
from llmopt.backends.gptq import GPTQBackend, GPTQOptions, lm_head_bits_of, lm_head_config, untie_lm_head
from llmopt.cli.quantize import merge_options
from llmopt.data import CalibrationSet
from llmopt.errors import EXIT_INPUT, InputError, ModelError, OptionsError
from llmopt.progress import SilentReporter
from llmopt.source import SourceModel
from tests.helpers import SMOLLM2_CONFIG, fake_model, random_models, write_safetensors
from tests.helpers import cli_in_process as run_cli
from tests.helpers import smollm2_source as source

# --- options -------------------------------------------------------------------------------------------


def test_off_by_default_and_nothing_passed_to_gptqmodel() -> None:
    opts = GPTQOptions()
    assert opts.quantize_lm_head is False and opts.head_bits is None
    assert lm_head_config(opts) == {}


@pytest.mark.parametrize(
    ("flags", "pairs"),
    [
        ({"quantize_lm_head": True}, None),  # --quantize-lm-head
        ({}, ["quantize_lm_head=true"]),
        ({}, ["quantize-lm-head=yes"]),
        ({"quantize_lm_head": True}, ["quantize_lm_head=on"]),  # the same value twice is one value
    ],
)
def test_flag_and_pair_give_the_option(flags: dict[str, Any], pairs: list[str] | None) -> None:
    options = merge_options(flags, pairs, "gptq")
    assert GPTQBackend().parse_options(options).quantize_lm_head is True


def test_flag_and_pair_that_disagree_are_refused() -> None:
    with pytest.raises(InputError, match="different values"):
        merge_options({"quantize_lm_head": True}, ["quantize_lm_head=false"], "gptq")


@pytest.mark.parametrize(
    ("options", "head"),
    [
        ({"quantize_lm_head": True}, 4),
        ({"quantize_lm_head": True, "bits": 8}, 8),
        ({"quantize_lm_head": True, "lm_head_bits": 8}, 8),
    ],
)
def test_the_head_follows_bits_and_group_size(options: dict[str, Any], head: int) -> None:
    """GPTQModel's own lm_head default is 8-bit g32; llmopt's head uses bits (or lm_head_bits) and group_size,
    written as a `dynamic` override (what vLLM and GPTQModel read per module)."""
    opts = GPTQBackend().parse_options({"group_size": 64, **options})
    assert isinstance(opts, GPTQOptions) and opts.head_bits == head
    assert lm_head_config(opts) == {
        "lm_head": True,
        "dynamic": {"lm_head": {"bits": head, "group_size": 64, "sym": True}},
    }
    assert lm_head_bits_of(opts.model_dump(mode="json")) == head


def test_lm_head_bits_without_quantize_lm_head_is_refused(tmp_path: Path) -> None:
    backend = GPTQBackend()
    with pytest.raises(OptionsError) as exc:
        backend.validate(backend.parse_options({"group_size": 64, "lm_head_bits": 8}), source(tmp_path), "cpu")
    assert "--quantize-lm-head" in str(exc.value) and exc.value.exit_code == EXIT_INPUT


def test_the_schema_names_the_flag() -> None:
    from llmopt.cli.quantize import OPTION_FLAGS

    names = {o.name for o in describe_backend("gptq").option_schema()}
    assert {"quantize_lm_head", "lm_head_bits"} <= names
    assert OPTION_FLAGS["quantize_lm_head"] == "--quantize-lm-head/--no-quantize-lm-head"


# --- AWQ refuses it ----------------------------------------------------------------------------------


def test_awq_refuses_quantize_lm_head(tmp_path: Path) -> None:
    backend = AWQBackend()
    with pytest.raises(OptionsError) as exc:
        backend.validate(backend.parse_options({"group_size": 64, "quantize_lm_head": True}), source(tmp_path), "cpu")
    assert "lm_head" in str(exc.value) and "--method gptq" in str(exc.value)
    assert exc.value.exit_code == EXIT_INPUT


def test_cli_awq_with_the_flag_exits_2_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers")
    code, err = run_cli(
        ["quantize", str(fake_model(tmp_path / "m")), "-m", "awq", "--group-size", "64", "--quantize-lm-head",
         "--calibration", "x", "--device", "cpu", "-o", str(tmp_path / "o")],
        capsys,
    )  # fmt: skip
    assert code == EXIT_INPUT, err
    assert err.startswith("error: ") and "Traceback" not in err
    assert "lm_head" in err and "  -> " in err and "--method gptq" in err
    assert not (tmp_path / "o").exists()


# --- what the card and manifest say -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "bits", "width"),
    [
        ({"bits": 4, "group_size": 64}, 4, "4-bit"),
        ({"bits": 4, "quantize_lm_head": False}, 4, "4-bit"),
        ({"bits": 4, "quantize_lm_head": True, "lm_head_bits": None}, 4, "4-bit, lm_head 4-bit"),
        # two widths: no single `bits` for the card's metadata
        ({"bits": 4, "quantize_lm_head": True, "lm_head_bits": 8}, None, "4-bit, lm_head 8-bit"),
    ],
)
def test_format_card_says_the_head_is_quantized(options: dict[str, Any], bits: int | None, width: str) -> None:
    facts = format_card("gptq", "gptq", options, "org/x")
    assert (facts.bits, facts.bit_width) == (bits, width)


def test_card_loads_a_quantized_head_with_gptqmodel_not_transformers() -> None:
    """transformers' AutoModelForCausalLM would load a quantized head as random weights: such a card shows
    GPTQModel.load (and vLLM); a card without a quantized head keeps the transformers snippet."""
    head = format_card("gptq", "gptq", {"bits": 4, "quantize_lm_head": True}, "org/x", "abc")
    code = "\n".join(s.code for s in head.load)
    assert 'GPTQModel.load("org/x", revision="abc")' in code and "AutoModelForCausalLM" not in code
    assert "vllm serve org/x" in code
    plain = format_card("gptq", "gptq", {"bits": 4, "quantize_lm_head": False}, "org/x")
    code = "\n".join(s.code for s in plain.load)
    assert "AutoModelForCausalLM.from_pretrained" in code and "GPTQModel" not in code


# --- loading: a quantized head must be loaded as one -------------------------------------------------


def _folder(tmp: Path, lm_head: bool, tensors: dict[str, tuple[str, list[int]]]) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    qcfg = {"quant_method": "gptq", "bits": 4, "group_size": 64, "lm_head": lm_head}
    (tmp / "config.json").write_text(json.dumps({**SMOLLM2_CONFIG, "quantization_config": qcfg}))
    write_safetensors(tmp / "model.safetensors", tensors)
    return tmp


def test_a_plain_head_where_the_checkpoint_quantized_it_is_refused(tmp_path: Path) -> None:
    from llmopt.runners.hf import check_quantized_lm_head

    model = tiny_llama(tie=False)  # lm_head: torch.nn.Linear, what transformers builds and fills at random
    packed = {"lm_head.qweight": ("F32", [16, 512]), "lm_head.scales": ("F16", [2, 512])}
    with pytest.raises(ModelError, match="plain layer") as exc:
        check_quantized_lm_head(model, _folder(tmp_path / "q", True, packed), "transformers")
    assert "lm_head" in str(exc.value) and "GPTQModel" in (exc.value.hint or "")
    check_quantized_lm_head(model, _folder(tmp_path / "p", False, {"lm_head.weight": ("F16", [512, 128])}), "x")


def test_a_quantized_head_without_stored_tensors_is_refused(tmp_path: Path) -> None:
    """A loader that built the head as a quantized layer from the config alone, with nothing stored for it,
    would score whatever the empty buffers hold."""
    import torch

    from llmopt.runners.hf import check_quantized_lm_head

    model = tiny_llama(tie=False)
    model.lm_head.register_buffer("qweight", torch.zeros(16, 512, dtype=torch.int32))
    with pytest.raises(ModelError, match=r"no safetensors file holds\s+lm_head.qweight"):
        check_quantized_lm_head(model, _folder(tmp_path / "q", True, {"w": ("F16", [4, 4])}), "GPTQModel")
    check_quantized_lm_head(model, _folder(tmp_path / "ok", True, {"lm_head.qweight": ("F32", [16, 512])}), "x")


# --- untying ------------------------------------------------------------------------------------------


def tiny_llama(tie: bool) -> Any:
    pytest.importorskip("torch")
    rm = random_models()
    return rm.build_fp16(rm.llama_config("tiny", tie_word_embeddings=tie), "cpu").float()


class _Wrapper:
    """What untie_lm_head reads of GPTQModel's model wrapper."""

    lm_head = "lm_head"

    def __init__(self, model: Any) -> None:
        self.model = model


def test_untie_gives_the_head_its_own_copy() -> None:
    import torch

    model = tiny_llama(tie=True)
    embed = model.get_input_embeddings().weight
    assert model.lm_head.weight is embed
    assert untie_lm_head(_Wrapper(model)) is True
    assert model.config.tie_word_embeddings is False
    assert model.lm_head.weight is not embed and model.lm_head.weight.data_ptr() != embed.data_ptr()
    assert torch.equal(model.lm_head.weight, embed)
    with torch.no_grad():
        model.lm_head.weight.mul_(0)  # what quantizing the head does to it must not reach the embedding
    assert embed.abs().sum() > 0


def test_untie_leaves_an_untied_model_alone() -> None:
    model = tiny_llama(tie=False)
    head = model.lm_head.weight
    assert untie_lm_head(_Wrapper(model)) is False
    assert model.lm_head.weight is head and model.config.tie_word_embeddings is False


def test_tiny_tied_model_quantizes_with_its_head_and_loads_back(tmp_path: Path) -> None:
    """The real path on a tiny tied Llama (hidden 128, vocab 512): GPTQModel would refuse the tied head; the
    checkpoint has a quantized head beside the 16-bit embedding, says tie_word_embeddings false and lm_head true
    (what vLLM reads), and loads back through llmopt's runner with the head as a quantized layer."""
    pytest.importorskip("gptqmodel")
    import torch
    from safetensors import safe_open

    model = tiny_llama(tie=True)
    src = random_models().save_fp16(model.half(), tmp_path / "src")
    assert json.loads((src / "config.json").read_text())["tie_word_embeddings"] is True
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in set(f.keys())  # tied: the head exists only as the embedding, as in SmolLM2
    backend = GPTQBackend()
    gen = torch.Generator().manual_seed(0)
    samples = [torch.randint(3, 500, (64,), generator=gen).tolist() for _ in range(4)]
    inputs = QuantizeInputs(
        source=SourceModel(spec=str(src), path=src, config=json.loads((src / "config.json").read_text())),
        options=backend.parse_options({"group_size": 64, "quantize_lm_head": True, "lm_head_bits": 8}),
        calibration=CalibrationSet(samples=samples, dataset="r", seq_len=64, tokens_sha256="", text_sha256=""),
        out_dir=tmp_path / "out",
        reporter=SilentReporter(),
        device="cpu",
    )
    (tmp_path / "out").mkdir()
    resolved = backend.quantize(inputs)
    assert "untied" in resolved["lm_head"]
    out = tmp_path / "out"
    config = json.loads((out / "config.json").read_text())
    qcfg = json.loads((out / "quantize_config.json").read_text())
    assert config["tie_word_embeddings"] is False
    for q in (qcfg, config["quantization_config"]):
        assert q["lm_head"] is True and (q["bits"], q["group_size"]) == (4, 64)
        assert q["dynamic"] == {"lm_head": {"bits": 8, "group_size": 64, "sym": True}}
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert {"lm_head.qweight", "lm_head.scales", "lm_head.qzeros"} <= names and "lm_head.weight" not in names
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "F16"
        # 8-bit: 4 values per int32 along the 128 inputs
        assert f.get_slice("lm_head.qweight").get_shape() == [32, 512]

    from llmopt.runners.hf import HFRunner

    runner = HFRunner(out, "cpu", loader="gptqmodel")
    try:
        # 14 decoder linears + the head, each dequantized for CPU scoring
        assert runner.kernel == "dense float32 (dequantized 15 gptq_torch layers)"
        head = runner.model.get_output_embeddings()
        assert type(head) is torch.nn.Linear and head.weight.dtype == torch.float32
        embed = model.get_input_embeddings().weight.float()
        # the head holds the 8-bit dequantization of the embedding: near it, never equal, never a fresh init
        head_err = ((head.weight - embed).norm() / embed.norm()).item()
        assert 0 < head_err < 0.02, head_err
        ids = torch.tensor([samples[0]])
        with torch.no_grad():
            logits = runner.model(input_ids=ids).logits.float()
            ref = model.float()(input_ids=ids).logits
        assert torch.isfinite(logits).all()
        assert 1e-4 < ((logits - ref).norm() / ref.norm()).item() < 0.2
    finally:
        runner.close()

    # transformers (through optimum) converts only the decoder blocks: it would leave lm_head a fresh random Linear
    # (the packed lm_head.* tensors ignored); llmopt's runner refuses that instead of scoring it
    with pytest.raises(ModelError, match="plain layer") as exc:
        HFRunner(out, "cpu", loader="hf")
    assert exc.value.exit_code == EXIT_INPUT and "GPTQModel" in (exc.value.hint or "")


# --- runs ---------------------------------------------------------------------------------------------


def test_an_artifact_made_before_the_option_existed_is_still_reused() -> None:
    """`llmopt run` reuses an artifact whose recorded options equal the variant's; one written before
    quantize_lm_head existed lacks the key, and means the default (no quantized head), not "options changed"."""
    from llmopt.pipeline import _recorded_options
    from llmopt.recipe import VariantSpec

    old = {k: v for k, v in GPTQOptions(group_size=64).model_dump(mode="json").items() if "lm_head" not in k}
    plain = VariantSpec(name="g", method="gptq", options={"group_size": 64})
    assert old != plain.backend_options() and _recorded_options("gptq", old) == plain.backend_options()
    head = VariantSpec(name="g", method="gptq", options={"group_size": 64, "quantize_lm_head": True})
    assert _recorded_options("gptq", old) != head.backend_options()
    assert _recorded_options("gptq", {**old, "bits": 5}) is None  # no longer valid: not reused


def test_size_bound_counts_an_untied_head() -> None:
    """`llmopt run`'s disk check: a tied head, untied, adds its quantized copy; measured on SmolLM2 (docs/gptq.md):
    GPTQ 4-bit g64 118.2 MB, with the 4-bit head 133.4 MB; the bound stays above and within 25%."""
    from llmopt.pipeline import artifact_bytes_bound

    assert SMOLLM2_CONFIG["tie_word_embeddings"] is True
    plain = artifact_bytes_bound("gptq", {"bits": 4, "group_size": 64}, SMOLLM2_CONFIG)
    head = artifact_bytes_bound("gptq", {"bits": 4, "group_size": 64, "quantize_lm_head": True}, SMOLLM2_CONFIG)
    assert 133.4e6 < head < 1.25 * 133.4e6 and head - plain >= 49152 * 576 * 4 / 8
    head8 = artifact_bytes_bound(
        "gptq", {"bits": 4, "group_size": 64, "quantize_lm_head": True, "lm_head_bits": 8}, SMOLLM2_CONFIG
    )
    assert head8 - head >= 49152 * 576 * 4 / 8
    untied = {**SMOLLM2_CONFIG, "tie_word_embeddings": False}
    # an untied head was counted at 16 bits; quantized it is smaller
    assert artifact_bytes_bound("gptq", {"quantize_lm_head": True}, untied) < artifact_bytes_bound("gptq", {}, untied)


# --- the real model -----------------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.slow
def test_smollm2_with_a_quantized_head_scores_near_fp16(assets: dict[str, Path], tmp_path: Path) -> None:
    """SmolLM2-135M (tied embeddings) GPTQ 4-bit g64 with a 4-bit head, through the API as the CLI runs it: untied,
    the head stored packed, loaded back as a quantized layer, dequantized for CPU scoring, and the artifact's
    distribution near FP16's but not equal to it. A short calibration (8 x 256 tokens) keeps it to minutes; too
    slow for CI on 2 cores: `python -m pytest -m slow tests/test_gptq_lm_head.py`."""
    import torch
    from safetensors import safe_open

    from llmopt.api import evaluate, quantize
    from llmopt.runners.hf import HFRunner

    art = quantize(
        str(assets["model"]),
        "gptq",
        tmp_path / "g4h4",
        options={"bits": 4, "group_size": 64, "quantize_lm_head": True},
        calibration=str(assets["calibration_text"]),
        samples=8,
        seq_len=256,
        device="cpu",
    )
    m = art.manifest
    assert m.options["quantize_lm_head"] is True and "untied" in m.options["_resolved"]["lm_head"]
    card = format_card("gptq", "gptq", m.options, "org/x")
    assert card.bit_width == "4-bit, lm_head 4-bit"
    config = json.loads((art.path / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["quantization_config"]["lm_head"] is True
    with safe_open(str(art.path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "lm_head.qweight" in names and "lm_head.weight" not in names and "model.embed_tokens.weight" in names

    ids = torch.tensor([list(range(1000, 1128))])
    fp16 = HFRunner(assets["model"], "cpu")
    try:
        embed = fp16.model.get_input_embeddings().weight.detach().float().clone()
        with torch.no_grad():
            ref = fp16.model(input_ids=ids).logits.float()
    finally:
        fp16.close()
    runner = HFRunner(art.path, "cpu", loader="gptqmodel")
    try:
        # 30 layers x 7 linears + the head
        assert runner.kernel == "dense float32 (dequantized 211 gptq_torch layers)"
        head = runner.model.get_output_embeddings().weight.detach().float()
        head_err = ((head - embed).norm() / embed.norm()).item()
        assert 0.01 < head_err < 0.25, head_err  # a 4-bit copy of the embedding, not the embedding, not noise
        with torch.no_grad():
            logits = runner.model(input_ids=ids).logits.float()
    finally:
        runner.close()
    rel = ((logits - ref).norm() / ref.norm()).item()
    assert 1e-3 < rel < 0.5, rel

    report = evaluate(
        art.path, str(assets["model"]), str(assets["eval_text"]), device="cpu", context_length=256, max_tokens=1024
    )
    ppl, base = report["artifact"]["perplexity"], report["baseline"]["perplexity"]
    assert base < ppl < 1.6 * base, (ppl, base)
    dist = report["artifact"]["distribution"]
    assert 0.01 < dist["kld_mean"] < 1.0 and 0.5 < dist["top1_agreement"] < 0.99, dist
    assert report["artifact"]["size_bytes"] < 0.6 * report["baseline"]["size_bytes"]


def test_random_checkpoint_with_a_packed_head_loads_its_head_quantized(tmp_path: Path) -> None:
    """The GPU benchmark's random GPTQ checkpoint with `lm_head=True` (variant `gptqhead`) carries the same head
    config the backend writes and loads through GPTQModel with the head as a quantized layer."""
    pytest.importorskip("gptqmodel")
    import json

    import torch

    from llmopt.runners import load_runner

    rm = random_models()
    folder = rm.write_random_gptq(tiny_llama(tie=False).half(), tmp_path / "head", group_size=128, lm_head=True)
    qcfg = json.loads((folder / "quantize_config.json").read_text())
    assert qcfg["lm_head"] is True and qcfg["dynamic"] == {"lm_head": {"bits": 4, "group_size": 128, "sym": True}}
    runner = load_runner("gptqmodel", folder, "cpu", kernel="torch")
    try:
        head = runner.model.lm_head  # type: ignore[attr-defined]
        assert type(head).__name__ != "Linear" and hasattr(head, "qweight")
        with torch.no_grad():
            logits = runner.model(torch.tensor([[1, 2, 3]])).logits  # type: ignore[attr-defined]
        assert logits.shape[-1] == 512 and bool(torch.isfinite(logits).all())
    finally:
        runner.close()


def test_the_files_decide_not_the_config_flag(tmp_path: Path) -> None:
    """config.json may say lm_head false (or drop it) while quantize_config.json and the files hold a packed head:
    transformers then reads config.json only and builds a random head, so the stored tensors decide. A flag that
    says true over a plain stored head (nothing packed) is a correct model and loads."""
    from llmopt.runners.hf import check_quantized_lm_head

    model = tiny_llama(tie=False)
    packed = {"lm_head.qweight": ("F32", [16, 512]), "lm_head.scales": ("F16", [2, 512])}
    with pytest.raises(ModelError, match=r"stores its output head quantized"):
        check_quantized_lm_head(model, _folder(tmp_path / "flag-off", False, packed), "transformers")
    check_quantized_lm_head(model, _folder(tmp_path / "flag-on", True, {"lm_head.weight": ("F16", [512, 128])}), "x")
