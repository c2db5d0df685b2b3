"""GPTQ through GPTQModel (AutoGPTQ's maintained successor).

Writes the standard GPTQ checkpoint layout (``quantization_config`` in config.json,
``quantize_config.json``), which transformers (through optimum + GPTQModel) and vLLM load; with a quantized
lm_head only GPTQModel and vLLM do (transformers initializes that head at random).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from llmopt._thirdparty import configure_gptqmodel_env, quiet_gptqmodel
from llmopt.backends._shapes import check_group_size
from llmopt.backends.base import Backend, QuantizeInputs, Requirement, save_tokenizer
from llmopt.backends.format_card import FormatCard, LoadSnippet, bits_of, transformers_snippet, vllm_snippet
from llmopt.errors import ModelError, OptionsError
from llmopt.source import SourceModel
from llmopt.units import WholeNumber


class GPTQOptions(BaseModel):
    """GPTQ options; defaults are GPTQModel's, which follow the paper except damping (0.05, not 0.01)."""

    model_config = ConfigDict(extra="forbid")
    bits: Literal[2, 3, 4, 8] = Field(4, description="Bits per weight.")
    group_size: WholeNumber = Field(128, description="Weights sharing one scale; -1 = one group per output row.")
    desc_act: bool = Field(False, description="Quantize columns in order of decreasing activation (act-order).")
    act_group_aware: bool | None = Field(
        None, description="GPTQModel's group-aware reordering (its default: on unless desc_act)."
    )
    sym: bool = Field(True, description="Symmetric quantization (no zero point).")
    damp_percent: float = Field(0.05, gt=0, lt=1, description="Hessian dampening, fraction of the mean diagonal.")
    true_sequential: bool = Field(True, description="Quantize sub-layers in order inside each block.")
    batch_size: WholeNumber = Field(1, ge=1, description="Calibration batch size.")
    quantize_lm_head: bool = Field(
        False,
        description=(
            "Quantize the output head (lm_head) too, at lm_head_bits and group_size; a model with tied embeddings "
            "gets its own copy of the head (the embedding stays 16-bit)."
        ),
    )
    lm_head_bits: Literal[2, 3, 4, 8] | None = Field(
        None, description="Bits of the quantized lm_head (with quantize_lm_head); default: bits."
    )

    @property
    def head_bits(self) -> int | None:
        """Bits of the quantized lm_head, or None when it stays 16-bit."""
        if not self.quantize_lm_head:
            return None
        return self.lm_head_bits if self.lm_head_bits is not None else self.bits


class GPTQBackend(Backend):
    name = "gptq"
    format = "gptq"
    runner = "gptqmodel"
    needs_calibration = True
    description = "GPTQ (GPTQModel): 2/3/4/8-bit weight-only, calibrated; served by vLLM, transformers, TGI."
    Options = GPTQOptions
    requirements = (
        Requirement("gptqmodel", "gptqmodel", "gptq"),
        Requirement("optimum", "optimum", "gptq"),
        Requirement("torch", "torch", "core"),
    )

    def format_card(self, options: dict[str, Any], repo_id: str, revision: str | None = None) -> FormatCard:
        bits = bits_of(self.format, options)
        width = f"{bits}-bit" if bits else None
        head = lm_head_bits_of(options)
        if head is not None:
            width = f"{width or 'GPTQ'}, lm_head {head}-bit"
            if head != bits:
                bits = None  # not every quantized weight has one width
        return FormatCard(
            format=self.format,
            library_name="transformers",
            tags=["gptq"],
            bits=bits,
            bit_width=width,
            load=[
                # transformers (through optimum) converts only the decoder blocks: a quantized head's packed tensors
                # are ignored and lm_head.weight is freshly initialized, i.e. random. GPTQModel loads the head.
                gptqmodel_snippet(repo_id, revision)
                if head is not None
                else transformers_snippet(repo_id, revision, needs="gptqmodel optimum"),
                vllm_snippet(repo_id, revision, "GPTQ is detected from `quantization_config`"),
            ],
        )

    def validate(self, options: BaseModel, source: SourceModel, device: str) -> None:
        assert isinstance(options, GPTQOptions)
        if options.lm_head_bits is not None and not options.quantize_lm_head:
            raise OptionsError(
                f"lm_head_bits={options.lm_head_bits} was given but the lm_head is not quantized.",
                "Add --quantize-lm-head (or -O quantize_lm_head=true), or drop -O lm_head_bits.",
            )
        # the lm_head's input is hidden_size, which check_group_size covers with q/k/v
        check_group_size(source.config, options.group_size)
        validate_gptqmodel_architecture(source)

    def quantize(self, inputs: QuantizeInputs) -> dict[str, Any]:
        opts = inputs.options
        assert isinstance(opts, GPTQOptions) and inputs.calibration is not None
        configure_gptqmodel_env()
        quiet_gptqmodel()
        from gptqmodel import GPTQModel, QuantizeConfig

        qcfg = QuantizeConfig(
            bits=opts.bits,
            group_size=opts.group_size,
            desc_act=opts.desc_act,
            act_group_aware=opts.act_group_aware if opts.act_group_aware is not None else not opts.desc_act,
            sym=opts.sym,
            damp_percent=opts.damp_percent,
            true_sequential=opts.true_sequential,
            **lm_head_config(opts),
        )
        head_bits = opts.head_bits
        placement = gptqmodel_gpus(qcfg, inputs)
        import torch

        # GPTQModel picks bf16 on CPU; where the CPU has no bf16 units that is emulated and ~10x slower
        # than fp32 (measured: 45 min for 6 of 30 SmolLM2 layers). fp32 is also the more exact Hessian.
        dtype: Any = torch.float32 if inputs.device == "cpu" else "auto"
        with inputs.reporter.step("loading model for GPTQ"):
            model = GPTQModel.load(
                str(inputs.source.path),
                qcfg,
                device=inputs.device,
                dtype=dtype,
                trust_remote_code=inputs.source.trust_remote_code,
            )
        untied = head_bits is not None and untie_lm_head(model)
        calib = [{"input_ids": s, "attention_mask": [1] * len(s)} for s in inputs.calibration.samples]
        head = f", lm_head {head_bits}-bit" if head_bits is not None else ""
        with inputs.reporter.step(f"GPTQ {opts.bits}-bit g{opts.group_size}{head} on {len(calib)} samples"):
            model.quantize(calib, batch_size=opts.batch_size, calibration_sort=None)
        with inputs.reporter.step("saving GPTQ checkpoint"):
            model.save(str(inputs.out_dir))
            if inputs.device == "cpu":
                store_fp16(inputs.out_dir)
            strip_machine_specific(inputs.out_dir)
            save_tokenizer(inputs)
        resolved: dict[str, Any] = {"placement": placement} if placement else {}
        if untied:
            resolved["lm_head"] = (
                "untied from the input embedding (tie_word_embeddings: false): the embedding stays 16-bit and the "
                f"{head_bits}-bit head is stored beside it, so the files grow by the quantized head while each "
                "decode step reads fewer bytes"
            )
        return resolved


def gptqmodel_snippet(repo_id: str, revision: str | None) -> LoadSnippet:
    """Loading with GPTQModel, which (unlike transformers) builds and loads a quantized lm_head."""
    rev = f', revision="{revision}"' if revision else ""
    code = "\n".join(
        [
            "from gptqmodel import GPTQModel",
            "from transformers import AutoTokenizer",
            "",
            f'model = GPTQModel.load("{repo_id}"{rev})',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}"{rev})',
        ]
    )
    return LoadSnippet(
        intro=(
            "With GPTQModel (needs `pip install gptqmodel`; transformers' AutoModelForCausalLM would load this "
            "quantized lm_head as random weights):"
        ),
        language="python",
        code=code,
    )


def lm_head_config(opts: GPTQOptions) -> dict[str, Any]:
    """GPTQModel ``QuantizeConfig`` arguments that quantize the lm_head (none when it stays 16-bit).

    GPTQModel's own lm_head default is 8-bit g32 (its module_looper); the head follows llmopt's options instead,
    through ``dynamic``, the per-module overrides quantize_config.json carries and vLLM and GPTQModel read.
    """
    head_bits = opts.head_bits
    if head_bits is None:
        return {}
    head = {"bits": head_bits, "group_size": opts.group_size, "sym": opts.sym}
    return {"lm_head": True, "dynamic": {"lm_head": head}}


def lm_head_bits_of(options: dict[str, Any]) -> int | None:
    """Bits of the quantized lm_head from recorded options (a manifest's), or None when it stayed 16-bit."""
    if not options.get("quantize_lm_head"):
        return None
    head = options.get("lm_head_bits")
    if head is None:
        head = options.get("bits", 4)
    return int(head)


def untie_lm_head(qmodel: Any) -> bool:
    """Give a tied model's output head its own copy of the embedding matrix, so GPTQ can quantize the head alone.

    ``qmodel``: GPTQModel's wrapper (``.model`` the transformers model, ``.lm_head`` the head's name). GPTQModel
    refuses to quantize an lm_head tied to the input embedding ("tied_weights=True ... not supported"):
    quantizing the shared matrix would quantize the embedding too. As GPTQModel itself does before rotation,
    ``tie_word_embeddings`` becomes false (the saved config.json says so, so loaders read the head from its own
    tensors) and the head's weight becomes a copy. GPTQModel loads weights lazily (still on the meta device
    here), so the embedding is read from the checkpoint first. Returns whether the model was tied.
    """
    import torch

    model = qmodel.model
    configs = [model.config]
    text_config = getattr(model.config, "text_config", None)
    if text_config is not None and text_config is not model.config:
        configs.append(text_config)
    if not any(getattr(c, "tie_word_embeddings", False) for c in configs):
        return False
    embed = model.get_input_embeddings()
    if embed.weight.is_meta:
        embed = qmodel.shell_module_materialize(embed, device=torch.device("cpu"))
    for c in configs:
        if hasattr(c, "tie_word_embeddings"):
            c.tie_word_embeddings = False
    head = model.get_submodule(getattr(qmodel, "lm_head", "lm_head"))
    head.weight = torch.nn.Parameter(embed.weight.detach().clone(), requires_grad=False)
    return True


def _keep_gpus(keep: frozenset[int], devices: list[Any]) -> list[Any]:
    return [d for d in devices if getattr(d, "type", None) != "cuda" or getattr(d, "index", None) in keep]


def gptqmodel_gpus(qcfg: Any, inputs: QuantizeInputs) -> dict[str, Any] | None:
    """Which GPUs GPTQModel may use for this job; sets ``qcfg.compute_device_filter``; the manifest record.

    GPTQModel (7.x) never places the whole model on GPUs: the unquantized model stays in host memory (or
    is read lazily from disk), and it quantizes one decoder layer at a time. The layer is staged on the
    first visible GPU; the calibration forward of that layer is replicated over every visible GPU and its
    GPTQ solves are spread over them too, unless ``compute_device_filter`` keeps fewer. So a model larger
    than one GPU quantizes as long as one layer (plus its calibration activations) fits on one; more GPUs
    make it faster, they are not needed to hold it. llmopt keeps it to the GPUs ``--device`` allows: one
    GPU for ``cuda:N`` (and for ``auto`` when the model fits on GPU 0), the listed or all GPUs otherwise.
    """
    from llmopt.placement import plan_placement

    target = inputs.target
    if target is None or target.mode == "cpu":
        return None
    import torch

    visible = int(torch.cuda.device_count())
    if target.mode == "fit":
        planned = plan_placement(target, inputs.source.path, dtype_bytes=2)
        gpus = [int(d.split(":")[1]) for d in planned.devices]
        reason = planned.reason
    else:
        gpus = list(target.gpus)
        reason = "the GPUs asked for"
    if len(gpus) < visible:
        import functools

        qcfg.compute_device_filter = functools.partial(_keep_gpus, frozenset(gpus))
    return {
        "mode": "layerwise",
        "requested": target.spec,
        "devices": [f"cuda:{g}" for g in gpus],
        "layers_per_device": {},
        "bytes_per_device": {},
        "reason": (
            f"{reason}; GPTQModel quantizes one layer at a time (model in host memory, layer staged on the first "
            "visible GPU, calibration forward and GPTQ solves on the GPUs listed)"
        ),
    }


def store_fp16(folder: Path) -> None:
    """Rewrite fp32 tensors (scales, embeddings, norms) of a CPU-made checkpoint as fp16.

    GPTQ checkpoints keep scales and unquantized tensors in fp16 (what vLLM and the CUDA kernels
    expect); quantizing in fp32 on CPU would otherwise give a larger file than the same job on a GPU.
    The source weights are fp16, so only the freshly computed scales are rounded.
    """
    import json

    import torch
    from safetensors.torch import load_file, save_file

    for path in sorted(folder.glob("*.safetensors")):
        tensors = load_file(path)
        if not any(t.dtype == torch.float32 for t in tensors.values()):
            continue
        converted = {k: (t.half() if t.dtype == torch.float32 else t).contiguous() for k, t in tensors.items()}
        save_file(converted, path, metadata={"format": "pt"})
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = "float16"
    config_path.write_text(json.dumps(config, indent=2) + "\n")


# GPTQModel's QuantizeConfig.meta keys that describe this run's machine, not the checkpoint.
_MACHINE_KEYS = ("offload_to_disk_path",)
# quant_log.csv columns that differ run to run (wall-clock seconds per module).
_VOLATILE_LOG_COLUMNS = ("time",)


def _strip_keys(value: Any, temp_prefix: str) -> Any:
    if isinstance(value, dict):
        return {
            k: _strip_keys(v, temp_prefix)
            for k, v in value.items()
            if k not in _MACHINE_KEYS and not (isinstance(v, str) and v.startswith(temp_prefix))
        }
    if isinstance(value, list):
        return [_strip_keys(v, temp_prefix) for v in value]
    return value


def strip_machine_specific(folder: Path) -> None:
    """Remove what only describes the machine and run from a GPTQModel checkpoint, before it is hashed.

    GPTQModel writes its temporary offload folder (``meta.offload_to_disk_path``, a local temp path) into
    config.json and quantize_config.json, and per-module timings, in thread completion order, into
    quant_log.csv: published files would carry a local path, and two identical runs could never give
    byte-identical artifacts. The loss/samples/damp columns of the log stay, rows in layer/module order.
    """
    import csv
    import io
    import json
    import tempfile

    temp_prefix = os.path.join(os.path.realpath(tempfile.gettempdir()), "")
    for name in ("config.json", "quantize_config.json"):
        path = folder / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        cleaned = _strip_keys(data, temp_prefix)
        if cleaned != data:
            path.write_text(json.dumps(cleaned, indent=2) + "\n")
    log = folder / "quant_log.csv"
    if log.is_file():
        rows = list(csv.DictReader(io.StringIO(log.read_text())))
        if rows:
            fields = [f for f in rows[0] if f not in _VOLATILE_LOG_COLUMNS]

            def order(row: Any) -> tuple[int, str]:
                layer = row.get("layer", "")
                return (int(layer) if layer.isdigit() else -1, row.get("module", ""))

            out = io.StringIO()
            writer = csv.DictWriter(out, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
            writer.writeheader()
            writer.writerows(sorted(rows, key=order))
            log.write_text(out.getvalue())


def validate_gptqmodel_architecture(source: SourceModel) -> None:
    """transformers must know the architecture, or neither it nor GPTQModel can build the model."""
    from transformers import CONFIG_MAPPING

    model_type = source.model_type
    if not model_type or model_type not in CONFIG_MAPPING:
        raise ModelError(
            f"architecture '{source.architecture or model_type}' (model_type '{model_type}') is not one this "
            "version of transformers knows, so GPTQModel cannot quantize it.",
            "Upgrade transformers, or pick a model with a supported architecture.",
        )


