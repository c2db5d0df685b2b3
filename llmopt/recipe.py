"""Recipes: one YAML file that says which model, which text, which variants, which gates, where to publish.

Every level is a pydantic model with ``extra="forbid"``: an unknown key is an error that names the valid
ones, with the file and line it is on. Backend options are validated by that backend's own ``Options``
model when the recipe is loaded, so a typo in ``options`` fails before any model is touched.

String values may use ``${VAR}`` or ``${VAR:-default}``; they are expanded before validation, and an
unset variable without a default is an error. Precedence: CLI flag > recipe file > defaults; a flag left
unset (None) never overrides the file.
"""

from __future__ import annotations

import contextlib
import datetime
import difflib
import os
import re
import string
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from llmopt.errors import LlmoptError, RecipeError
from llmopt.specs import CalibrationSpec, EvalSpec, GateSpec

RECIPE_SCHEMA_ID = "llmopt.recipe/1"
_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")
PUBLISH_FIELDS = ("org", "model_name", "variant", "method")
GGUF_REPO_ID = "{org}/{model_name}-GGUF"


def _error(text: str, at: tuple[Any, ...] = ()) -> PydanticCustomError:
    """A validation error whose message is exactly ``text`` (pydantic would prefix 'Value error, ').

    ``at``: where below the failing model the problem is (e.g. ``("variants", 2, "name")``), so a check made on the
    whole recipe still names the line it is about rather than the recipe's first line."""
    return PydanticCustomError("recipe", "{text}", {"text": text, "at": at})


def _one_line(exc: LlmoptError) -> str:
    return exc.message.rstrip(".") + (f"; {exc.hint}" if exc.hint else "")


def _backend_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    from llmopt.backends.base import describe_backend

    try:
        return describe_backend(method).parse_options(options).model_dump(mode="json")
    except LlmoptError as exc:
        raise _error(_one_line(exc)) from None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Strict):
    source: str = Field(description="A Hugging Face model folder, a .gguf file, or a Hub id (org/name).")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) when source is a Hub id.")
    trust_remote_code: bool = Field(
        False,
        description="Allow the model's own Python code (config auto_map) to run; default: such models are refused.",
    )


# The recipe's old name of the evaluation settings; they live in llmopt/specs.py with the other specs.
EvaluationSpec = EvalSpec


class VariantSpec(_Strict):
    name: str = Field(pattern=_NAME, description="Unique name; used for the artifact folder and the Hub repo.")
    method: str = Field(description="Backend name (see `llmopt backends`).")
    options: dict[str, Any] = Field(default_factory=dict, description="Options of that backend.")
    gate: GateSpec | None = Field(None, description="Thresholds that replace the recipe's `gates` for this variant.")

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        from llmopt.backends.base import describe_backend

        try:
            describe_backend(value)  # what it is, not whether it runs here: that is checked when quantizing
        except LlmoptError as exc:
            raise _error(_one_line(exc)) from None
        return value

    @field_validator("options")
    @classmethod
    def _options_fit_backend(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        method = info.data.get("method")
        if method is not None:  # else the method itself failed, and that error is the one to read
            _backend_options(method, value)
        return value

    def backend_options(self) -> dict[str, Any]:
        """Options validated by the backend's own model, defaults filled in (as the manifest records them)."""
        return _backend_options(self.method, self.options)

    def needs_calibration(self) -> bool:
        """Whether quantizing this variant needs calibration text (gguf: only for an importance matrix)."""
        from llmopt.backends.base import describe_backend

        backend = describe_backend(self.method)  # not check(): planning must not probe a toolchain
        return backend.wants_calibration(backend.parse_options(self.options))


class PublishSpec(_Strict):
    repo_id: str = Field(
        "{org}/{model_name}-{variant}",
        description="Hub repo id template; fields: {org}, {model_name}, {variant}, {method}.",
    )
    organization: str | None = Field(None, description="Value of {org}; default: the user the token belongs to.")
    private: bool = Field(False, description="Create new repos as private (an existing repo keeps its visibility).")
    mode: Literal["repo-per-variant", "branch-per-variant", "gguf-one-repo"] = Field(
        "repo-per-variant",
        description="One repo per variant; one repo with a branch per variant; or (GGUF variants only) one repo "
        "with one .gguf file per quant type and a card table of them all (repo_id default: "
        "{org}/{model_name}-GGUF).",
    )
    base_model: str | None = Field(
        None,
        description="Hub id of the model quantized, for the model card (default: the source when a Hub id).",
    )
    license: str | None = Field(None, description="License for the model card (default: read from the source).")
    tags: list[str] = Field(default_factory=list, description="Extra model card tags.")
    benchmarks: dict[str, str] = Field(
        default_factory=dict,
        description="lm-eval task -> Hub benchmark 'DATASET_ID:TASK_ID' (e.g. arc_easy: 'allenai/ai2_arc:ARC-Easy'): "
        "the task's score also goes up as .eval_results/TASK.yaml (docs/publish.md). Opt-in: only you can say the "
        "dataset is a registered Hub benchmark with that task.",
    )
    benchmark_local_data: bool = Field(
        False, description="Let benchmarks map a local task: you state its data file is the benchmark's own data."
    )

    @field_validator("repo_id")
    @classmethod
    def _known_fields(cls, value: str) -> str:
        try:
            names = [field for _, field, _, _ in string.Formatter().parse(value) if field is not None]
        except ValueError as exc:
            raise _error(f"invalid template {value!r}: {exc}") from None
        unknown = [n for n in names if n not in PUBLISH_FIELDS]
        if unknown:
            valid = ", ".join("{" + f + "}" for f in PUBLISH_FIELDS)
            raise _error(f"unknown field {{{unknown[0]}}} in {value!r}; valid fields: {valid}")
        if any(spec or conv for _, _, spec, conv in string.Formatter().parse(value)):
            raise _error(
                f"{value!r}: repo_id fields take no format spec or conversion (write {{variant}}, not {{variant:x}})"
            )
        # Filled with harmless sample values, the template must already be a valid repo id: a '..' or '--'
        # in the fixed text would otherwise pass here and fail only at publish time, after all the work.
        from llmopt.hub import check_repo_id

        sample = value.format(org="org", model_name="model", variant="v1", method="gptq")
        try:
            check_repo_id(sample)
        except LlmoptError as exc:
            raise _error(f"{value!r} cannot make a valid Hub repo id (e.g. {sample!r}): {_one_line(exc)}") from None
        return value

    @field_validator("tags")
    @classmethod
    def _tags(cls, value: list[str]) -> list[str]:
        from llmopt.hub import check_tags

        for tag in value:
            try:
                check_tags([tag])
            except LlmoptError:
                raise _error(f"tag {tag!r} is empty or holds a line break; give each tag a name") from None
        return value

    @field_validator("benchmarks")
    @classmethod
    def _benchmarks(cls, value: dict[str, str]) -> dict[str, str]:
        from llmopt.hub import parse_benchmarks

        try:
            parsed = parse_benchmarks(value)
        except LlmoptError as exc:
            raise _error(_one_line(exc)) from None
        # as parsed (spaces around names dropped), so the run compares the task names evaluation.tasks runs
        return {b.task: f"{b.dataset_id}:{b.task_id}" for b in parsed}

    @model_validator(mode="before")
    @classmethod
    def _gguf_repo_name(cls, data: Any) -> Any:
        # one repo for every quant type: the default template's {variant} would split them up again
        if isinstance(data, dict) and data.get("mode") == "gguf-one-repo" and "repo_id" not in data:
            return {**data, "repo_id": GGUF_REPO_ID}
        return data

    @model_validator(mode="after")
    def _mode_matches_template(self) -> PublishSpec:
        has_variant = "{variant}" in self.repo_id
        if self.mode == "gguf-one-repo" and has_variant:
            raise _error(
                "mode gguf-one-repo puts every GGUF variant into one repo: drop {variant} from repo_id "
                f"(e.g. {GGUF_REPO_ID!r}, the default)"
            )
        if self.mode == "repo-per-variant" and not has_variant:
            raise _error(
                "mode repo-per-variant needs {variant} in repo_id (else every variant lands in one repo); "
                "add it, or use mode: branch-per-variant"
            )
        if self.mode == "branch-per-variant" and has_variant:
            raise _error(
                "mode branch-per-variant puts each variant on its own branch of one repo: drop {variant} from repo_id"
            )
        if self.mode == "gguf-one-repo" and self.benchmarks:
            from llmopt.gguf_repo import BENCHMARKS_REFUSED

            raise _error(f"benchmarks: {BENCHMARKS_REFUSED}; drop benchmarks, or use another mode")
        return self


def _name_clashes(names: list[Any]) -> list[tuple[str, int]]:
    """(message, index) of each variant whose name repeats an earlier one, exactly or but for case: artifacts/NAME
    and the Hub repo NAME are one folder, one repo, on a case-insensitive file system (macOS, Windows) and on the
    Hub. Names that are not strings are left to the field checks."""
    exact: set[str] = set()
    folded: dict[str, str] = {}  # casefold -> the first name written so
    found: list[tuple[str, int]] = []
    for i, name in enumerate(names):
        if not isinstance(name, str):
            continue
        first = folded.setdefault(name.casefold(), name)
        if name in exact:
            found.append((f"variant name '{name}' is used twice; give each variant its own name", i))
        elif first != name:
            found.append(
                (
                    f"variant names '{first}' and '{name}' differ only by case: their artifact folders (and Hub "
                    "repos) would be one on a case-insensitive file system; rename one",
                    i,
                )
            )
        exact.add(name)
    return found


class Recipe(_Strict):
    """Schema of a recipe file (``llmopt.recipe/1``)."""

    name: str | None = Field(None, pattern=_NAME, description="Recipe name (default: the file name).")
    description: str | None = None
    model: ModelSpec
    calibration: CalibrationSpec = Field(default_factory=lambda: CalibrationSpec.model_validate({}))
    evaluation: EvaluationSpec
    gates: GateSpec = Field(
        default_factory=lambda: GateSpec.model_validate({}),
        description="Default thresholds for every variant.",
    )
    variants: list[VariantSpec] = Field(min_length=1)
    publish: PublishSpec | None = None
    output: str | None = Field(None, description="Output folder of `llmopt run` (the --output flag overrides).")

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        clashes = _name_clashes([v.name for v in self.variants])
        if clashes:
            text, i = clashes[0]  # the rest are added where the errors are shown (parse_recipe): all at once
            raise _error(text, ("variants", i, "name"))
        if self.evaluation.throughput is None:
            for i, v in enumerate(self.variants):
                if self.gate_for(v).min_decode_speedup is not None:
                    raise _error(
                        f"variant '{v.name}' gates on min_decode_speedup, which needs speed measurements: "
                        "add evaluation.throughput (e.g. `throughput: {}`)",
                        ("variants", i),
                    )
        if not self.evaluation.tasks and self.evaluation.task_limit is not None:
            raise _error("evaluation.task_limit picks the examples of evaluation.tasks, but no tasks are given")
        if self.publish is not None and self.publish.benchmarks and not self.evaluation.tasks:
            raise _error(
                "publish.benchmarks maps lm-eval tasks to Hub benchmarks, but evaluation.tasks runs none: "
                "add them there (e.g. `tasks: [arc_easy]`)",
                ("publish", "benchmarks"),
            )
        if self.publish is not None and self.publish.benchmarks and self.evaluation.task_limit is not None:
            raise _error(
                "publish.benchmarks publishes scores over whole benchmarks, and evaluation.task_limit scores only the "
                "first examples of each task: drop task_limit (or the benchmarks)",
                ("publish", "benchmarks"),
            )
        if not self.evaluation.tasks:
            for i, v in enumerate(self.variants):
                if self.gate_for(v).min_recovery is not None:
                    raise _error(
                        f"variant '{v.name}' gates on min_recovery, which needs task accuracies: "
                        "add evaluation.tasks (e.g. `tasks: [arc_easy]`, or a local task file)",
                        ("variants", i),
                    )
        if self.publish is not None and self.publish.mode == "gguf-one-repo":
            self._check_gguf_one_repo()
        serving = self.evaluation.serving
        for i, v in enumerate(self.variants):
            gate = self.gate_for(v)
            if gate.needs_serving() and serving is None:
                raise _error(
                    f"variant '{v.name}' gates on slo/min_goodput, which need serving measurements: "
                    "add evaluation.serving (e.g. `serving: {rates: [1, 2]}`)",
                    ("variants", i),
                )
            at = gate.slo_at_rate
            if at is not None and serving is not None and (serving.rates is None or at not in serving.rates):
                swept = ", ".join(f"{r:g}" for r in serving.rates or []) or "none (concurrency mode)"
                raise _error(
                    f"variant '{v.name}': slo_at_rate {at:g} is not among evaluation.serving.rates ({swept}); "
                    "add it there or pick one of them",
                    ("variants", i),
                )
        if self.calibration.dataset is None:
            for i, v in enumerate(self.variants):
                if v.needs_calibration():
                    raise _error(
                        f"variant '{v.name}' ({v.method}) needs calibration text: set calibration.dataset",
                        ("variants", i),
                    )
        return self

    def _check_gguf_one_repo(self) -> None:
        """Every variant is GGUF and no two share a quant type: the repo holds one file per type."""
        from llmopt.backends.base import describe_backend

        seen: dict[str, str] = {}
        for i, v in enumerate(self.variants):
            fmt = describe_backend(v.method).format
            if fmt != "gguf":
                raise _error(
                    f"publish.mode gguf-one-repo publishes GGUF files only, and variant '{v.name}' is {v.method} "
                    f"({fmt}): put it in a recipe of its own, or use mode repo-per-variant or branch-per-variant",
                    ("variants", i),
                )
            quant = str(v.backend_options().get("quant_type", "")).upper()
            if quant in seen:
                raise _error(
                    f"variants '{seen[quant]}' and '{v.name}' are both {quant}, and publish.mode gguf-one-repo "
                    "holds one file per quant type: drop one, or publish it from another recipe",
                    ("variants", i),
                )
            seen[quant] = v.name

    def gate_for(self, variant: VariantSpec) -> GateSpec:
        """The recipe's gates with the variant's own thresholds laid over them (only those it sets)."""
        merged = self.gates.model_dump()
        if variant.gate is not None:
            merged.update({k: getattr(variant.gate, k) for k in variant.gate.model_fields_set})
        return GateSpec.model_validate(merged)

    def variant(self, name: str) -> VariantSpec:
        for v in self.variants:
            if v.name == name:
                return v
        names = [v.name for v in self.variants]
        close = difflib.get_close_matches(name, names, n=1)
        raise RecipeError(
            f"the recipe has no variant '{name}'" + (f" (did you mean '{close[0]}'?)" if close else "") + ".",
            f"variants: {', '.join(names)}",
        )

    def resolved(self) -> dict[str, Any]:
        """The recipe as it will run: env expanded, overrides applied, defaults filled in, and each
        variant's ``gate`` replaced by the thresholds that apply to it."""
        data = self.model_dump(mode="json")
        for item, variant in zip(data["variants"], self.variants, strict=True):
            item["gate"] = self.gate_for(variant).model_dump(mode="json")
        return data


def recipe_json_schema() -> dict[str, Any]:
    schema = Recipe.model_json_schema()
    schema["$id"] = RECIPE_SCHEMA_ID
    schema["title"] = "llmopt recipe"
    return schema


# --- loading ---------------------------------------------------------------------------------------


def expand_env(value: str, *, where: str = "") -> str:
    """``${VAR}`` / ``${VAR:-default}``; a leading ``~`` of the result is the home folder."""

    def sub(m: re.Match[str]) -> str:
        var, default = m.group(1), m.group(2)
        got = os.environ.get(var)
        if got:
            return got
        if default is not None:
            return default
        raise RecipeError(
            f"{where}${{{var}}} is not set.",
            f"Set {var} in the environment, or write ${{{var}:-default}} in the recipe.",
        )

    out = _ENV.sub(sub, value)
    return os.path.expanduser(out) if out.startswith("~") else out


def _expand_tree(data: Any, lines: dict[tuple[Any, ...], int], source: str, path: tuple[Any, ...] = ()) -> Any:
    if isinstance(data, dict):
        return {k: _expand_tree(v, lines, source, (*path, k)) for k, v in data.items()}
    if isinstance(data, list):
        return [_expand_tree(v, lines, source, (*path, i)) for i, v in enumerate(data)]
    if isinstance(data, str) and ("${" in data or data.startswith("~")):
        return expand_env(data, where=f"{_where(source, lines, path)}{_dotted(path)}: ")
    return data


def _line_at(lines: dict[tuple[Any, ...], int], loc: tuple[Any, ...]) -> int | None:
    """The line of ``loc`` or of the nearest key above it; 0 for the command line, None for nowhere."""
    for n in range(len(loc), -1, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return None


def _where(source: str, lines: dict[tuple[Any, ...], int], loc: tuple[Any, ...]) -> str:
    line = _line_at(lines, loc)
    if line is None:
        return f"{source}: "
    return f"{source}:{line}: " if line else f"{COMMAND_LINE}: "


COMMAND_LINE = "command line"  # where a value given by a flag or --set is said to be (its "line" is 0)


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "recipe"


MAX_RECIPE_VALUES = 100_000


def _expanded_size(value: Any, memo: dict[int, int]) -> int:
    """How many values ``value`` holds once every alias is written out (shared pieces counted once each)."""
    if not isinstance(value, dict | list):
        return 1
    if id(value) not in memo:
        items = value.values() if isinstance(value, dict) else value
        memo[id(value)] = 1 + sum(_expanded_size(v, memo) for v in items)
    return memo[id(value)]


def _marked(exc: Any, source: str, what: str, hint: str) -> RecipeError:
    """A YAML error with its place (``SOURCE:LINE:COLUMN: what: problem``)."""
    mark = exc.problem_mark or exc.context_mark
    at = f"{source}:{mark.line + 1}:{mark.column + 1}: " if mark else f"{source}: "
    return RecipeError(f"{at}{what}: {exc.problem or exc.context}", hint)


def _yaml_with_lines(text: str, source: str) -> tuple[Any, dict[tuple[Any, ...], int]]:
    """Parse YAML keeping the line of every key and item, and refusing duplicate keys."""
    import yaml

    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        raise _marked(
            exc,
            source,
            "not valid YAML",
            "Fix the YAML syntax at that line (indentation, quotes, a ':' after each key).",
        ) from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{source}: not valid YAML: {exc}", "Fix the YAML syntax.") from None
    if node is None:
        raise RecipeError(f"{source} is empty.", "Start from `llmopt recipe schema` or a file in recipes/.")

    lines: dict[tuple[Any, ...], int] = {}
    constructor = yaml.SafeLoader("")

    active: set[int] = set()  # the nodes being built: an alias back to one of them is a cycle
    built: dict[int, Any] = {}  # collection nodes already built, by identity

    def build(n: yaml.Node, path: tuple[Any, ...]) -> Any:
        lines.setdefault(path, n.start_mark.line + 1)
        if isinstance(n, (yaml.MappingNode, yaml.SequenceNode)):
            if id(n) in active:
                raise RecipeError(
                    f"{source}:{n.start_mark.line + 1}: a YAML alias refers to the anchor that contains it "
                    f"(at {_dotted(path)}): the value would be infinite.",
                    "Replace the alias (*name) with the value it should have.",
                )
            if id(n) in built:  # an alias of a collection built before: the same value, not built again
                return built[id(n)]  # (rebuilding made nested aliases grow exponentially: 5.8 GB for 8 levels)
            active.add(id(n))
            try:
                built[id(n)] = _build_collection(n, path)
                return built[id(n)]
            finally:
                active.discard(id(n))
        return constructor.construct_object(n, deep=True)

    def _build_collection(n: yaml.Node, path: tuple[Any, ...]) -> Any:
        if isinstance(n, yaml.MappingNode):
            out: dict[Any, Any] = {}
            merges = [k for k, _ in n.value if k.tag == "tag:yaml.org,2002:merge"]
            if len(merges) > 1:
                raise RecipeError(
                    f"{source}:{merges[1].start_mark.line + 1}: key '<<' appears twice in {_dotted(path)}.",
                    "Merge several mappings with one key: <<: [*first, *second] (the first wins).",
                )
            # YAML merge keys (`<<: *defaults`): the merged mappings' keys first, the explicit keys over them
            for key_node, value_node in n.value:
                if key_node.tag != "tag:yaml.org,2002:merge":
                    continue
                sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                for src in reversed(sources):  # of several merged mappings the first holds: built last
                    if not isinstance(src, yaml.MappingNode):
                        raise RecipeError(
                            f"{source}:{key_node.start_mark.line + 1}: a YAML merge key (<<) takes a mapping or a "
                            "list of mappings.",
                            "Point it at a mapping's anchor (<<: *defaults), or write the keys out.",
                        )
                    out.update(build(src, path))
            explicit: set[Any] = set()
            for key_node, value_node in n.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                if not isinstance(key_node, yaml.ScalarNode):
                    raise RecipeError(
                        f"{source}:{key_node.start_mark.line + 1}: a key of {_dotted(path)} is a list or a mapping.",
                        "Write keys as plain names (key: value).",
                    )
                key = constructor.construct_object(key_node, deep=True)
                if not isinstance(key, str):  # `1:`, `true:`, `null:` are names as written (1 == True in Python)
                    key = key_node.value
                if key in explicit:
                    raise RecipeError(
                        f"{source}:{key_node.start_mark.line + 1}: key '{key}' appears twice in {_dotted(path)}.",
                        "Keep one of them.",
                    )
                explicit.add(key)
                lines[(*path, key)] = key_node.start_mark.line + 1
                out[key] = build(value_node, (*path, key))
            return out
        return [build(item, (*path, i)) for i, item in enumerate(n.value)]

    try:
        data = build(node, ()), lines
    except yaml.MarkedYAMLError as exc:  # a value YAML cannot construct (an unknown tag, say)
        raise _marked(
            exc,
            source,
            "not a value a recipe can hold",
            "Write plain YAML values (strings, numbers, lists, mappings); no tags.",
        ) from None
    values = _expanded_size(data[0], {})
    if values > MAX_RECIPE_VALUES:
        raise RecipeError(
            f"{source}: its aliases expand to {values:,} values (a recipe holds a few hundred).",
            "Write the values out, or use fewer nested aliases (*name).",
        )
    return data


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the key at the end of ``loc`` (for listing valid keys)."""
    current: Any = Recipe
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)) or part not in current.model_fields:
            return None
        current = _unwrap(current.model_fields[part].annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _unwrap(args[0]) if len(args) == 1 else annotation
    if origin is list:
        return _unwrap(typing.get_args(annotation)[0])
    return annotation


_INT_ERRORS = ("int_type", "int_parsing", "int_from_float", "int_parsing_size")
_FLOAT_ERRORS = ("float_type", "float_parsing", "finite_number")


def _key_of(loc: tuple[Any, ...]) -> str:
    """The name of the key at ``loc`` (for a list item, its list's key)."""
    return next((str(part) for part in reversed(loc) if not isinstance(part, int)), "value")


def _type_message(err: Any, loc: tuple[Any, ...]) -> str | None:
    """A wrong type, said as the type expected and how to write it in YAML; None for every other error."""
    kind, given = err["type"], err.get("input")
    key = _key_of(loc)
    got = ("true" if given else "false") if isinstance(given, bool) else repr(given)
    if isinstance(given, datetime.date):
        got = given.isoformat()
    if kind == "list_type" and isinstance(given, str | int | float) and not isinstance(given, bool):
        # '1,8' or '1 8' or 8: written as one value where a YAML list is expected
        items = [p for p in re.split(r"[,\s]+", str(given).strip("[] ")) if p]
        shown = ", ".join(items) if items and all(re.fullmatch(r"[+-]?\d+(\.\d*)?", p) for p in items) else "1, 8"
        return f"expected a YAML list, got {got}: write e.g. `{key}: [{shown}]`"
    if kind in _INT_ERRORS:
        quoted = " ('16', quoted, is read as 16 too)" if isinstance(given, str) else ""
        # an item of a list of counts (batch_sizes[1]): the example is a list, not `batch_sizes: 16`
        example = "[1, 8]" if loc and isinstance(loc[-1], int) else "16"
        return f"expected a whole number, got {got}: write e.g. `{key}: {example}`{quoted}"
    if kind in _FLOAT_ERRORS:
        return f"expected a number, got {got}: write e.g. `{key}: 0.5`"
    if kind in ("bool_type", "bool_parsing"):
        return f"expected true or false, got {got}: write e.g. `{key}: true`"
    if kind == "string_type" and isinstance(given, bool | int | float | datetime.date):
        # YAML read unquoted text as another type: `no`/`off` are false, 2024-01-01 a date, 1e3 a number
        example = "'no'" if isinstance(given, bool) else f"'{given}'"
        return f"expected text, got {got} (YAML's reading of the unquoted value): quote it, e.g. `{key}: {example}`"
    return None


def _describe(err: Any, source: str, lines: dict[tuple[Any, ...], int], data: Any) -> str:
    loc = tuple(err["loc"])
    at = (err.get("ctx") or {}).get("at") or ()
    where = _where(source, lines, (*loc, *at))
    if err["type"] == "extra_forbidden":
        owner = _model_at(loc)
        parent = _dotted(loc[:-1]) if loc[:-1] else "the recipe's top level"
        valid = sorted(owner.model_fields) if owner else []
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        return (
            f"{where}unknown key '{loc[-1]}' in {parent}"
            + (f" (did you mean '{close[0]}'?)" if close else "")
            + (f"; valid keys: {', '.join(valid)}" if valid else "")
        )
    if err["type"] == "missing":
        return f"{where}{_dotted(loc)} is required"
    # Point variant-level problems at the variant by name, which reads better than an index.
    label = _dotted(loc)
    if len(loc) >= 2 and loc[0] == "variants" and isinstance(loc[1], int):
        with contextlib.suppress(KeyError, IndexError, TypeError):
            name = data["variants"][loc[1]]["name"]
            if isinstance(name, str):  # (a name YAML read as false or a date is said by its place)
                label = f"variant '{name}'" + (f" {_dotted(loc[2:])}" if loc[2:] else "")
    msg = _type_message(err, loc) or err["msg"]
    return f"{where}{label}: {msg}" if loc else f"{where}{msg}"


def parse_recipe(data: Any, *, source: str = "recipe", lines: dict[tuple[Any, ...], int] | None = None) -> Recipe:
    """Validate an already-loaded recipe mapping (env expansion included)."""
    checked = _check(data, source, lines or {})
    if isinstance(checked, Recipe):
        return checked
    _refuse(checked, source)


def _check(data: Any, source: str, lines: dict[tuple[Any, ...], int]) -> Recipe | list[tuple[int, str]]:
    """The recipe, or its problems as (line, text) (line 0: the command line's, or no line)."""
    if not isinstance(data, dict):
        raise RecipeError(
            f"{source}: a recipe is a YAML mapping (model:, evaluation:, variants: ...), not a {type(data).__name__}.",
            "See `llmopt recipe schema` or the files in recipes/.",
        )
    data = _expand_tree(data, lines, source)
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()

    def place(err: Any) -> int:
        return _line_at(lines, (*err["loc"], *((err.get("ctx") or {}).get("at") or ()))) or 0

    found = [(place(e), _describe(e, source, lines, data)) for e in errors]
    # Every name clash too, not only the first, nor only once the fields are right: the whole-recipe check that
    # finds them runs after the fields pass, and stops at one.
    shown = {(*e["loc"], *((e.get("ctx") or {}).get("at") or ())) for e in errors}
    variants = data.get("variants")
    names = [v.get("name") if isinstance(v, dict) else None for v in variants] if isinstance(variants, list) else []
    for text, i in _name_clashes(names):
        if ("variants", i, "name") not in shown:
            err = {"type": "recipe", "loc": (), "msg": text, "ctx": {"text": text, "at": ("variants", i, "name")}}
            found.append((place(err), _describe(err, source, lines, data)))
    return found


def _refuse(found: list[tuple[int, str]], source: str) -> typing.NoReturn:
    found = sorted(found, key=lambda item: item[0])  # top to bottom of the file, as an editor shows it
    problems = [text for _, text in found]
    head = problems[0] if len(problems) == 1 else f"{source}: {len(problems)} problems:\n  " + "\n  ".join(problems)
    flagged = any(text.startswith(f"{COMMAND_LINE}: ") for text in problems)
    what = "the recipe or the flag (--set and the like)" if flagged else "the recipe"
    raise RecipeError(head, f"Fix {what}; `llmopt recipe schema` prints every key with its meaning.")


def _on_command_line(text: str, source: str) -> str:
    """A problem's text said to be on the command line instead of at a place in ``source``."""
    rest = re.sub(rf"^{re.escape(source)}(:\d+)?: ", "", text, count=1)
    return rest if rest.startswith(f"{COMMAND_LINE}: ") else f"{COMMAND_LINE}: {rest}"


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> Recipe:
    """Read and validate a recipe file; errors name the file and line.

    ``overrides`` (dotted keys, as ``--set`` gives them; None clears a key) are applied to the file's values
    before they are validated, so that a flag can fix a value the file has wrong; a problem with an overridden
    value is said to be on the command line."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise RecipeError(
            f"recipe file {p} does not exist" + (" (it is a folder)" if p.is_dir() else "") + ".",
            "Give the path of a .yaml recipe, e.g. one of the files in recipes/.",
        )
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"cannot read {p}: {exc}", "Check the file's permissions and encoding (UTF-8).") from None
    data, lines = _yaml_with_lines(text, str(path))
    source = str(path)
    if not (overrides and isinstance(data, dict)):
        recipe = parse_recipe(data, source=source, lines=lines)
    else:
        given, given_lines = data, dict(lines)
        data = _unshared(data)  # an alias's value is one object in every place it is used: set only the one named
        for dotted, value in overrides.items():
            at = _set_path(data, dotted, value)
            owner = _model_at(at)
            if value is None and owner is not None and at[-1] not in owner.model_fields:
                _pop_path(data, at)  # null clears a key; one the recipe does not know (a typo) goes
            for loc in [loc for loc in lines if loc[: len(at)] == at]:
                del lines[loc]  # the file's lines for what the command line replaced
            for n in range(1, len(at) + 1):
                lines.setdefault(at[:n], 0)  # keys the command line added are its own, not the file's
        checked = _check(data, source, lines)
        if not isinstance(checked, Recipe):
            # a problem the file alone does not have is the flags' doing, wherever pydantic puts it (an option
            # set by --set is reported at its variant's `options`, a line of the file)
            try:
                alone = _check(given, source, given_lines)
            except RecipeError:
                alone = []
            own = {text for _, text in alone} if isinstance(alone, list) else set()
            _refuse([(ln, t) if t in own else (0, _on_command_line(t, source)) for ln, t in checked], source)
        recipe = checked
    if recipe.name is None:
        recipe.name = re.sub(r"[^A-Za-z0-9._-]", "-", p.stem) or "recipe"
    return recipe


# --- overrides -------------------------------------------------------------------------------------


def apply_overrides(
    recipe: Recipe, overrides: dict[str, Any], *, keep_none: bool = False, source: str = "command line"
) -> Recipe:
    """Set dotted keys (``evaluation.max_tokens``, ``variants.NAME.options.bits``).

    A None value is an unset CLI flag and is skipped, unless ``keep_none`` (``--set key=null`` clears a
    key on purpose). The result is validated again, so an override obeys the same rules as the file.
    """
    given = {k: v for k, v in overrides.items() if keep_none or v is not None}
    if not given:
        return recipe
    # exclude_unset keeps "not given" distinct from "given as null" (it matters for gate overrides)
    data = recipe.model_dump(mode="json", exclude_unset=True)
    for dotted, value in given.items():
        _set_path(data, dotted, value)
    new = parse_recipe(data, source=source)
    return new


def _pop_path(data: Any, at: tuple[Any, ...]) -> None:
    """Remove the key at ``at`` (a path _set_path resolved)."""
    node = data
    for part in at[:-1]:
        node = node[part]
    if isinstance(node, dict):
        node.pop(at[-1], None)


def _unshared(value: Any) -> Any:
    """A copy in which no list or mapping appears twice (aliases were expanded to the same objects)."""
    if isinstance(value, dict):
        return {k: _unshared(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unshared(v) for v in value]
    return value


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> tuple[Any, ...]:
    """Set ``dotted`` (list items by name, even a name with dots, or by index) in ``data``; the path it resolved to
    (indices for items)."""
    parts = dotted.split(".")
    node: Any = data
    at: list[Any] = []
    i = 0
    while i < len(parts):
        part = parts[i]
        if isinstance(node, list):
            names = [item.get("name") if isinstance(item, dict) else None for item in node]
            idx, used = None, 1
            for k in range(len(parts), i, -1):  # the longest name that matches: `int8.v1` before `int8`
                name = ".".join(parts[i:k])
                if name in names:
                    idx, used = names.index(name), k - i
                    break
            if idx is None and re.fullmatch(r"[0-9]+", part) and int(part) < len(node):
                idx = int(part)
            if idx is None:
                named = [n for n in names if isinstance(n, str)]  # (a name YAML read as false cannot be given)
                raise RecipeError(
                    f"--set {dotted}: no item '{part}' in {'.'.join(parts[:i])}"
                    + ("" if node else " (it is empty)")
                    + ".",
                    ("Name one of: " + ", ".join(named) + "; or an index" if named else "Give an index")
                    + f" 0-{len(node) - 1}"
                    if node
                    else "Set the whole list first, e.g. --set 'evaluation.tasks=[a, b]'.",
                )
            at.append(idx)
            i += used
            if i == len(parts):
                node[idx] = value
            else:
                node = node[idx]
            continue
        if not isinstance(node, dict):
            raise RecipeError(f"--set {dotted}: {'.'.join(parts[:i])} is not a mapping.", "Check the key path.")
        at.append(part)
        i += 1
        if i == len(parts):
            node[part] = value
        else:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
    return tuple(at)


def parse_set_flags(pairs: list[str] | None) -> dict[str, Any]:
    """``--set key.path=value`` flags, in order (a key given twice takes its last value, applied last); values are
    read as YAML (numbers, booleans, lists, mappings), without anchors or aliases."""
    import yaml

    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise RecipeError(
                f"--set '{pair}' is not of the form key.path=value.",
                "Write e.g. --set evaluation.max_tokens=512",
            )
        if any(not part.strip() for part in key.split(".")):
            raise RecipeError(
                f"--set '{pair}': the key path '{key}' has an empty part.",
                "Write the keys between the dots, e.g. --set evaluation.max_tokens=512",
            )
        try:
            events = list(yaml.parse(raw, Loader=yaml.SafeLoader))
            if any(isinstance(e, yaml.AliasEvent) or getattr(e, "anchor", None) for e in events):
                raise RecipeError(
                    f"--set '{_short(pair)}': the value uses a YAML anchor or alias (&name, *name).",
                    "Write the value out in full; anchors and aliases belong in the recipe file.",
                )
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise RecipeError(
                f"--set '{_short(pair)}': the value is not valid YAML ({problem}).",
                "Quote it as a string (--set 'key=\"text\"'), or write a number, true/false, or a [list].",
            ) from None
        text = raw.strip()
        plain = not text.startswith(("'", '"', "[", "{", "!"))
        if "#" in text and plain and (isinstance(value, str) or (value is None and text.startswith("#"))):
            value = text  # `a/my model #2` is a path, not a value and a YAML comment
        out.pop(key, None)  # given again: the last one wins, applied after the others
        out[key] = value
    return out


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
