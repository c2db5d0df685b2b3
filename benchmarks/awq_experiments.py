#!/usr/bin/env python3
"""Controlled experiments behind docs/awq.md: why GPTQModel's AWQ scored worse than llm-compressor's.

Each sub-command measures one thing on SmolLM2-135M (or any small Llama-like folder, --model) and prints one
JSON line. Perplexity is always on the first --max-tokens tokens of the evaluation text (--text), cut into
windows of --context tokens, every token after the first of each window scored: the windows `llmopt eval`
uses with stride = context. All scoring runs on the CPU in float32 unless said otherwise.

  base       the model itself, loaded in --dtype (float32 / bfloat16 / float16).
  rtn        round-to-nearest fake quantization of every decoder linear (--group-size, --zero-point), no
             calibration: the floor any calibrated method must beat.
  ref-awq    a short, readable re-implementation of AutoAWQ's algorithm (RefAWQ below) on fake-quantized
             weights, in --dtype, calibrated on --samples x --seq-len tokens cut by llmopt's calibration_set;
             switches for each suspected difference: --no-clip, --identity (ratio 0 without w_mean in the
             grid), --no-duo (x_mean^r alone), --propagate-quantized (next layer sees quantized outputs).
             Also prints the mean chosen grid ratio and the mean loss of the chosen scale / loss without one.
  library    GPTQModel's own AWQ (GEMM layout) with the same settings, saved under --out, then scored as
             `artifact` does. --calib-docs calibrates on paragraphs of their own lengths instead (what a
             list of documents gives), and the output records GPTQModel's activation aggregation per layer
             ("batch" = every token used; "latest_batch" = only the last batch). --patch no-clip skips
             the clipping search; --patch no-prev-scale drops GPTQModel's w_mean hint from the previous
             subset. --num-layers N quantizes a copy cut to its first N decoder layers (fast checks).
  artifact   scores an existing AWQ GEMM checkpoint twice: through GPTQModel's CPU kernel (--kernel, in
             --load-dtype) and dequantized into a dense float32 copy of --model (isolates the algorithm
             from the inference kernel).

Run it niced, one at a time, e.g. `nice -n 10 python benchmarks/awq_experiments.py rtn --group-size 64`.
On this CPU (2 vCPU, no AVX-512) ref-awq takes ~10 minutes for SmolLM2 with 8 x 256 calibration tokens, and
GPTQModel's AWQ 20 s (4 x 64 tokens) to a minute (8 x 256) per decoder layer: it computes in float16 or
bfloat16, emulated here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "passive")
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(1, os.cpu_count() or 1)))

import torch
from torch import nn

ASSETS = Path(os.environ.get("LLMOPT_ASSETS", Path.home() / ".cache" / "llmopt" / "assets"))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------------------- scoring
def eval_ids(model_dir: Path, text: Path, max_tokens: int) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(text.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    return list(ids[:max_tokens] if max_tokens else ids)


def perplexity(forward: Callable[[torch.Tensor], torch.Tensor], ids: list[int], context: int) -> dict[str, float]:
    from llmopt.evaluate.perplexity import make_windows, score

    windows = make_windows(ids, context, context)

    def nll(batch: list[list[int]], score_from: list[int]) -> list[list[float]]:
        x = torch.tensor(batch, dtype=torch.long)
        with torch.inference_mode():
            logp = torch.log_softmax(forward(x)[:, :-1, :].float(), dim=-1)
            tok = -logp.gather(-1, x[:, 1:].unsqueeze(-1)).squeeze(-1)
        return [row[max(s, 1) - 1 :] for row, s in zip(tok.tolist(), score_from, strict=True)]

    r = score(windows, nll, batch_size=1)
    return {"ppl": round(r.perplexity, 4), "stderr": round(r.stderr, 4), "tokens": r.tokens_scored}


def hf_forward(model: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: model(input_ids=x, use_cache=False).logits


def load_hf(model_dir: Path, dtype: torch.dtype) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


# ------------------------------------------------------------------------------ fake quantization
def pseudo_quantize(w: torch.Tensor, bits: int, group: int, zero_point: bool) -> torch.Tensor:
    """AutoAWQ's pseudo_quantize_tensor: round-to-nearest per group, asymmetric when zero_point."""
    shape = w.shape
    w = w.reshape(-1, group)
    if zero_point:
        mx, mn = w.amax(dim=1, keepdim=True), w.amin(dim=1, keepdim=True)
        qmax = 2**bits - 1
        scale = (mx - mn).clamp(min=1e-5) / qmax
        zero = (-torch.round(mn / scale)).clamp(0, qmax)
        w = (torch.clamp(torch.round(w / scale) + zero, 0, qmax) - zero) * scale
    else:
        mx = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-5)
        qmax, qmin = 2 ** (bits - 1) - 1, -(2 ** (bits - 1))
        scale = mx / qmax
        w = torch.clamp(torch.round(w / scale), qmin, qmax) * scale
    return w.reshape(shape)


def decoder_linears(layer: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}


def rtn_(model: Any, bits: int, group: int, zero_point: bool) -> None:
    with torch.no_grad():
        for layer in model.model.layers:
            for lin in decoder_linears(layer).values():
                lin.weight.copy_(pseudo_quantize(lin.weight.float(), bits, group, zero_point).to(lin.weight.dtype))


# ------------------------------------------------------------------------- reference AWQ (AutoAWQ)
class RefAWQ:
    """AutoAWQ's algorithm for Llama-like decoders, written out plainly, on fake-quantized weights.

    Per decoder layer: capture the inputs of each linear, search one scale vector per group
    (input_layernorm -> q/k/v, v_proj -> o_proj when shapes allow, post_attention_layernorm ->
    gate/up, up_proj -> down_proj) by grid search over s = x_mean^r / w_mean^(1-r), apply it,
    search the clipping range of each linear (not q/k), then round to nearest.
    """

    def __init__(
        self,
        bits: int,
        group: int,
        zero_point: bool,
        *,
        n_grid: int = 20,
        duo_scaling: bool = True,
        identity_in_grid: bool = False,
        clip: bool = True,
        propagate_quantized: bool = False,
    ) -> None:
        self.bits, self.group, self.zero_point = bits, group, zero_point
        self.n_grid, self.duo, self.identity = n_grid, duo_scaling, identity_in_grid
        self.clip, self.propagate_quantized = clip, propagate_quantized
        self.log: list[dict[str, Any]] = []

    def q(self, w: torch.Tensor) -> torch.Tensor:
        return pseudo_quantize(w, self.bits, self.group, self.zero_point)

    @torch.no_grad()
    def run(self, model: Any, samples: list[list[int]]) -> None:
        layers = model.model.layers
        x = model.model.embed_tokens(torch.tensor(samples, dtype=torch.long))
        pos = torch.arange(x.shape[1]).unsqueeze(0)
        pe = model.model.rotary_emb(x, pos)
        kwargs = {"attention_mask": None, "position_ids": pos, "position_embeddings": pe}
        for i, layer in enumerate(layers):
            feats = self._inputs(layer, x, kwargs)
            fp_out = layer(x, **kwargs)
            fp_out = fp_out[0] if isinstance(fp_out, tuple) else fp_out
            self._layer(layer, feats, kwargs, i)
            print(f"layer {i} done", file=sys.stderr, flush=True)
            if self.propagate_quantized:
                out = layer(x, **kwargs)
                x = out[0] if isinstance(out, tuple) else out
            else:
                x = fp_out

    def _inputs(self, layer: nn.Module, x: torch.Tensor, kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
        feats: dict[str, torch.Tensor] = {}
        hooks = []
        for name, lin in decoder_linears(layer).items():
            hooks.append(lin.register_forward_hook(lambda _m, a, _o, n=name: feats.__setitem__(n, a[0].detach())))
        layer(x, **kwargs)
        for h in hooks:
            h.remove()
        return feats

    def _layer(self, layer: Any, feats: dict[str, torch.Tensor], kwargs: dict[str, Any], idx: int) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        attn_kwargs = {k: kwargs[k] for k in ("attention_mask", "position_embeddings")}
        groups: list[tuple[Any, list[nn.Linear], str, nn.Module, dict[str, Any]]] = [
            (layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj], "self_attn.q_proj", attn, attn_kwargs),
        ]
        if attn.v_proj.weight.shape == attn.o_proj.weight.shape:  # skipped under GQA, as AutoAWQ does
            groups.append((attn.v_proj, [attn.o_proj], "self_attn.o_proj", attn.o_proj, {}))
        groups += [
            (layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj], "mlp.gate_proj", mlp, {}),
            (mlp.up_proj, [mlp.down_proj], "mlp.down_proj", mlp.down_proj, {}),
        ]
        names = {id(m): n for n, m in decoder_linears(layer).items()}
        for prev, linears, feat_name, inspect, kw in groups:
            s, ratio, err0, err = self._search(feats[feat_name], linears, inspect, kw)
            self.log.append({"layer": idx, "group": feat_name, "ratio": ratio, "loss_gain": err / err0})
            self._apply_scale(prev, linears, s)
            for lin in linears:
                feats[names[id(lin)]] = feats[names[id(lin)]] / s  # inputs of the scaled layers, for clipping
        for name, lin in decoder_linears(layer).items():
            if self.clip and not any(k in name for k in ("q_proj", "k_proj")):
                self._clip(lin, feats[name])
            lin.weight.copy_(self.q(lin.weight))

    def _search(
        self, x: torch.Tensor, linears: list[nn.Linear], inspect: nn.Module, kw: dict[str, Any]
    ) -> tuple[torch.Tensor, float, float, float]:
        def fwd() -> torch.Tensor:
            out = inspect(x, **kw)
            return out[0] if isinstance(out, tuple) else out

        x_mean = x.abs().reshape(-1, x.shape[-1]).float().mean(0)
        w = torch.cat([lin.weight for lin in linears], dim=0).float()
        wg = w.abs().reshape(-1, self.group)
        w_mean = (wg / (wg.amax(dim=1, keepdim=True) + 1e-6)).reshape(w.shape).mean(0)
        ref = fwd()
        orig = [lin.weight.clone() for lin in linears]
        grid: list[tuple[float, bool]] = [(r / self.n_grid, self.duo) for r in range(self.n_grid)]
        if self.identity:
            grid = [(0.0, False), *grid]
        best = (math.inf, -1.0, torch.ones_like(x_mean))
        err_identity = math.nan
        for ratio, duo in grid:
            if duo:
                s = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
            else:
                s = x_mean.pow(ratio).clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            for lin, w0 in zip(linears, orig, strict=True):
                lin.weight.copy_(self.q(w0 * s.view(1, -1)) / s.view(1, -1))
            err = (fwd() - ref).float().pow(2).mean().item()
            if ratio == 0.0 and not duo:
                err_identity = err
            if err < best[0]:
                best = (err, ratio, s.clone())
        for lin, w0 in zip(linears, orig, strict=True):
            lin.weight.copy_(w0)
        if math.isnan(err_identity):  # measure it for the log anyway
            for lin, w0 in zip(linears, orig, strict=True):
                lin.weight.copy_(self.q(w0))
            err_identity = (fwd() - ref).float().pow(2).mean().item()
            for lin, w0 in zip(linears, orig, strict=True):
                lin.weight.copy_(w0)
        return best[2], best[1], err_identity, best[0]

    @staticmethod
    def _apply_scale(prev: Any, linears: list[nn.Linear], s: torch.Tensor) -> None:
        if isinstance(prev, nn.Linear):
            prev.weight[-s.numel() :].div_(s.view(-1, 1).to(prev.weight.dtype))
        else:
            prev.weight.div_(s.to(prev.weight.dtype))
        for lin in linears:
            lin.weight.mul_(s.view(1, -1).to(lin.weight.dtype))

    def _clip(self, lin: nn.Linear, x: torch.Tensor, n_grid: int = 20, max_shrink: float = 0.5) -> None:
        """AutoAWQ's clipping search (same grid, same 512 sampled tokens), with per-group partial
        products done as batched matmuls instead of broadcast multiply-and-sum."""
        w = lin.weight.float()
        co, ci = w.shape
        g = self.group
        x = x.reshape(-1, ci).float()
        x = x[:: max(1, x.shape[0] // 512)]
        xg = x.reshape(x.shape[0], ci // g, g).transpose(0, 1)  # [G, T, g]
        wg = w.reshape(co, ci // g, g)  # [co, G, g]
        org_max = wg.abs().amax(dim=-1, keepdim=True)  # [co, G, 1]
        org_out = torch.bmm(xg, wg.permute(1, 2, 0))  # [G, T, co]
        best_max, min_err = org_max.clone(), torch.full_like(org_max, math.inf)
        for i in range(int(max_shrink * n_grid)):
            mx = org_max * (1 - i / n_grid)
            qw = self.q(torch.clamp(wg, -mx, mx).reshape(co, ci)).reshape(co, ci // g, g)
            err = (torch.bmm(xg, qw.permute(1, 2, 0)) - org_out).pow(2).mean(dim=1)  # [G, co]
            err = err.t().unsqueeze(-1)  # [co, G, 1]
            better = err < min_err
            min_err[better], best_max[better] = err[better], mx[better]
        lin.weight.copy_(torch.clamp(wg, -best_max, best_max).reshape(co, ci).to(lin.weight.dtype))


# ----------------------------------------------------------------------------------- GPTQModel AWQ
def calib_samples(model_dir: Path, calibration: Path, samples: int, seq_len: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    from llmopt.data import calibration_set

    tok = AutoTokenizer.from_pretrained(model_dir)
    return calibration_set(tok, str(calibration), samples=samples, seq_len=seq_len, seed=0).samples


def calib_documents(model_dir: Path, calibration: Path, samples: int, max_len: int) -> list[list[int]]:
    """Paragraphs of the calibration text as samples of their own lengths (<= max_len), as a user passing a
    list of documents would: what GPTQModel's AWQ handles differently from equal-length samples."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    paras = [p for p in calibration.read_text(encoding="utf-8").split("\n\n") if len(p) > 200]
    out = [tok(p, add_special_tokens=False)["input_ids"][:max_len] for p in paras[:samples]]
    print(f"document lengths: {[len(s) for s in out]}", file=sys.stderr, flush=True)
    return out


def run_gptqmodel(args: argparse.Namespace) -> dict[str, Any]:
    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel.looper import awq_processor
    from gptqmodel.quantization.config import FORMAT, METHOD, QuantizeConfig

    patches = set(args.patch or [])
    if "no-clip" in patches:
        orig_init = awq_processor.AWQProcessor.__init__

        def init(self: Any, *a: Any, **k: Any) -> None:
            orig_init(self, *a, **k)
            self.apply_clip = False

        awq_processor.AWQProcessor.__init__ = init
    if "no-prev-scale" in patches:
        orig_q = awq_processor.AWQProcessor._quantize_layer

        def quantize_layer(self: Any, layer_index: int, state: Any) -> None:
            state.previous_weight_scale = None  # read back as the w_mean hint in _compute_best_scale
            orig_q(self, layer_index, state)

        awq_processor.AWQProcessor._quantize_layer = quantize_layer
    aggregation: list[dict[str, Any]] = []
    orig_features = awq_processor.AWQProcessor._layer_input_features

    def layer_input_features(self: Any, state: Any) -> Any:
        features = orig_features(self, state)
        stats = dict(self._feature_stats)
        aggregation.append(
            {
                "modes": sorted({v.get("mode") for v in stats.values()}),
                "raw_tokens": max((int(v.get("raw_tokens", 0)) for v in stats.values()), default=0),
                "retained_tokens": min((int(v.get("retained_tokens", 0)) for v in stats.values()), default=0),
            }
        )
        return features

    awq_processor.AWQProcessor._layer_input_features = layer_input_features

    model_dir = cut_model(args.model, args.num_layers, args.out) if args.num_layers else args.model
    qcfg = QuantizeConfig(
        quant_method=METHOD.AWQ,
        format=FORMAT.GEMM,
        bits=args.bits,
        group_size=args.group_size,
        sym=not args.zero_point,
    )
    kw: dict[str, Any] = {}
    if args.dtype != "auto":
        kw["dtype"] = DTYPES[args.dtype]
    t0 = time.perf_counter()
    model = GPTQModel.load(str(model_dir), qcfg, device="cpu", backend=BACKEND.AWQ_TORCH, **kw)
    if args.calib_docs:
        samples = calib_documents(args.model, args.calibration, args.samples, args.seq_len)
    else:
        samples = calib_samples(args.model, args.calibration, args.samples, args.seq_len)
    calib = [{"input_ids": s, "attention_mask": [1] * len(s)} for s in samples]
    model.quantize(calib, batch_size=args.batch_size, calibration_sort=None, backend=BACKEND.AWQ_TORCH)
    artifact = args.out / "awq"
    model.save(str(artifact))
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(args.model).save_pretrained(artifact)
    seconds = time.perf_counter() - t0
    del model
    res = score_artifact(artifact, args, base_model=model_dir)
    res["quantize_seconds"] = round(seconds, 1)
    res["calibration_lengths"] = sorted({len(x) for x in samples})
    res["aggregation"] = {
        "modes": sorted({m for a in aggregation for m in a["modes"]}),
        "raw_tokens": max((a["raw_tokens"] for a in aggregation), default=0),
        "retained_tokens": min((a["retained_tokens"] for a in aggregation), default=0),
        "layers": len(aggregation),
    }
    return res


def cut_model(model_dir: Path, layers: int, out: Path) -> Path:
    """A copy of ``model_dir`` with only its first ``layers`` decoder layers (for quick library runs)."""
    from transformers import AutoTokenizer

    model = load_hf(model_dir, torch.float16)
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    dest = out / f"base-{layers}-layers"
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(dest)
    return dest


def dequantize_awq_gemm(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """AutoAWQ GEMM layout -> dense [out, in] weight (fp32)."""
    # Column j of each group of 8 sits in nibble REVERSE[j] of the int32 (AutoAWQ packs in order 0,2,4,6,1,3,5,7).
    reverse = [0, 4, 1, 5, 2, 6, 3, 7]
    shifts = torch.tensor([4 * r for r in reverse], dtype=torch.int32)

    def unpack(t: torch.Tensor) -> torch.Tensor:
        v = (t.unsqueeze(-1) >> shifts) & 0xF
        return v.reshape(t.shape[0], -1)

    iw = unpack(qweight)  # [in, out]
    iz = unpack(qzeros)  # [in/group, out]
    s = scales.float()  # [in/group, out]
    w = (iw.float() - iz.float().repeat_interleave(group, dim=0)) * s.repeat_interleave(group, dim=0)
    return w.t().contiguous()


def score_artifact(path: Path, args: argparse.Namespace, base_model: Path | None = None) -> dict[str, Any]:
    """Perplexity of an AWQ GEMM checkpoint through GPTQModel's kernel and as a dense fp32 copy of its base."""
    ids = eval_ids(args.model, args.text, args.max_tokens)
    out: dict[str, Any] = {"artifact": str(path)}
    if args.kernel:
        from gptqmodel import BACKEND, GPTQModel

        kw: dict[str, Any] = {}
        if args.load_dtype != "auto":
            kw["dtype"] = DTYPES[args.load_dtype]
        m = GPTQModel.load(str(path), device="cpu", backend=BACKEND.AWQ_TORCH, **kw)
        out["kernel"] = perplexity(hf_forward(m.model), ids, args.context)
        out["kernel_dtype"] = str(next(m.model.parameters()).dtype)
        del m
    # Dense fp32 view of the same checkpoint: isolates the algorithm from the inference kernel.
    from safetensors.torch import load_file

    cfg = json.loads((path / "config.json").read_text())
    group = cfg["quantization_config"]["group_size"]
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(f))
    model = load_hf(base_model or args.model, torch.float32)
    sd = model.state_dict()
    with torch.no_grad():
        for name, t in tensors.items():
            if name.endswith(".qweight"):
                base = name[: -len(".qweight")]
                w = dequantize_awq_gemm(t, tensors[base + ".qzeros"], tensors[base + ".scales"], group)
                sd[base + ".weight"].copy_(w)
            elif name in sd and not name.endswith((".qzeros", ".scales")):
                sd[name].copy_(t.float())
    out["dense_fp32"] = perplexity(hf_forward(model), ids, args.context)
    return out


# ------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cmd", choices=["base", "rtn", "ref-awq", "library", "artifact"])
    p.add_argument("path", nargs="?", type=Path, help="artifact folder (artifact)")
    p.add_argument("--model", type=Path, default=ASSETS / "smollm2-135m-instruct")
    p.add_argument("--text", type=Path, default=ASSETS / "text" / "britannica-eval.txt")
    p.add_argument("--calibration", type=Path, default=ASSETS / "text" / "britannica-calib.txt")
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--dtype", default="float32", choices=[*DTYPES, "auto"])
    p.add_argument("--load-dtype", default="auto", choices=[*DTYPES, "auto"])
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--zero-point", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--clip", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--identity", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--duo", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--propagate-quantized", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--kernel", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--calib-docs", action="store_true", help="library: paragraphs of their own lengths")
    p.add_argument("--patch", action="append", choices=["no-clip", "no-prev-scale"], help="library only")
    p.add_argument("--num-layers", type=int, default=0, help="library: quantize the first N decoder layers only")
    p.add_argument("--out", type=Path, default=Path("out") / "awq-experiments", help="library: where to write")
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    if args.cmd == "library" and args.dtype == "float32":
        p.error("library: GPTQModel's AWQ runs in float16 or bfloat16 only; pass --dtype float16 (or auto)")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    res: dict[str, Any] = {"cmd": args.cmd, "tag": args.tag}
    if args.cmd in ("base", "rtn", "ref-awq"):
        dtype = DTYPES[args.dtype if args.dtype != "auto" else "float32"]
        model = load_hf(args.model, dtype)
        ids = eval_ids(args.model, args.text, args.max_tokens)
        if args.cmd == "rtn":
            rtn_(model, args.bits, args.group_size, args.zero_point)
        elif args.cmd == "ref-awq":
            awq = RefAWQ(
                args.bits,
                args.group_size,
                args.zero_point,
                duo_scaling=args.duo,
                identity_in_grid=args.identity,
                clip=args.clip,
                propagate_quantized=args.propagate_quantized,
            )
            awq.run(model, calib_samples(args.model, args.calibration, args.samples, args.seq_len))
            ratios = [e["ratio"] for e in awq.log]
            res["mean_ratio"] = round(sum(ratios) / len(ratios), 3)
            res["mean_loss_gain"] = round(sum(e["loss_gain"] for e in awq.log) / len(awq.log), 3)
            res["quantize_seconds"] = round(time.perf_counter() - t0, 1)
        res.update(perplexity(hf_forward(model), ids, args.context))
    elif args.cmd == "library":
        res.update(run_gptqmodel(args))
    else:
        if args.path is None:
            p.error("artifact needs a path")
        res.update(score_artifact(args.path, args))
    keep = (
        "dtype",
        "group_size",
        "zero_point",
        "samples",
        "seq_len",
        "clip",
        "identity",
        "duo",
        "patch",
        "propagate_quantized",
        "max_tokens",
        "load_dtype",
        "calib_docs",
        "num_layers",
    )
    res["settings"] = {k: getattr(args, k) for k in keep}
    res["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
