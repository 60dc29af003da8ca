"""Configs: one pydantic class per recipe (the paper's defaults live there), a YAML file per
recipe (`recipes/configs/NAME.yaml`, the tiny-world values), and `key=value` overrides
from the command line, validated with one clear line per mistake.

Precedence: class defaults < YAML < command line.
"""

from __future__ import annotations

import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from selfevolve.errors import UserError


class Keys(BaseModel):
    """Keys every command takes. Same words in the CLI, YAML and code; each command's config
    is made of the groups below that it really uses, so a key it would ignore is refused
    like a typo (docs/architecture.md, "Configs per command")."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    seed: int = Field(0, description="seeds data order, sampling and initialisation")
    debug: bool = Field(False, description="show tracebacks instead of one-line errors")


class ModelKeys(Keys):
    """The served model: what answers, where, and how much per call."""

    model: str = Field("tiny", description="`tiny` or `tiny-look` (bundled), a local HF model directory, or an "
                       "http(s):// endpoint (several, comma-separated: a fleet of replicas)")
    policy: str = Field("hf", pattern="^(hf|vllm|openai)$",
                        description="serving engine: hf (transformers) | vllm | openai (model= is a URL)")
    device: str = Field("auto", pattern="^(auto|cpu|cuda(:[0-9]+)?)$", description="auto|cpu|cuda (the learner's too)")
    dtype: str = Field(
        "auto", pattern="^(auto|float32|bfloat16|float16)$",
        description="weights of the served model and the learner's base: auto = bfloat16 on CUDA, float32 on CPU",
    )
    threads: int = Field(2, ge=1, description="torch CPU threads (fixed, so runs reproduce)")
    sampling_from_model: bool = Field(
        False, description="apply the checkpoint's own generation defaults (repetition_penalty, top_k, ...); "
        "off: temperature 1 samples from the model's distribution itself")
    max_new_tokens: int = Field(96, ge=1, description="generation budget per turn")
    batch_size: int = Field(64, ge=1, description="prompts per generation batch")
    keep_adapters: int = Field(4, ge=2, description="openai: adapter versions a server keeps loaded at most")
    request_priority: int = Field(0, description="openai: the `priority` sent with each generation request (lower "
                                  "is answered sooner; selfevolve serve queues by it, vLLM needs "
                                  "--scheduling-policy priority for any value but 0)")
    on_sync_error: str = Field("raise", pattern="^(raise|drop)$", description="a fleet replica that fails an adapter "
                               "sync: raise (roll every replica back, stop) | drop (go on without it)")


class DataKeys(Keys):
    """Where tasks come from, and how many processes check them."""

    data: str = Field("arith", description="built-in task suite name or a dataset path")
    prompt_field: str = Field("prompt", description="column holding the prompt in a user dataset")
    answer_field: str = Field("answer", description="column holding the reference answer")
    id_field: str = Field("id", description="column holding a task id (else file name + line)")
    tests_field: str = Field("tests", description="column holding a code task's tests (asserts, or a check() program)")
    entry_point_field: str = Field("entry_point", description="column holding a code task's function name")
    difficulty: int = Field(3, ge=1, le=8, description="arith, equations: operators per expression")
    eval_fraction: float = Field(0.2, gt=0, lt=1, description="test share carved (seeded) from a source without a "
                                 "test split (a flat file, humaneval)")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="validation share carved (seeded) from a source without "
                                "a validation split")
    verify_workers: int = Field(1, ge=1, description="verifier worker processes (>1 runs a VerifierPool)")
    since_version: str | None = Field(None, description="data= a trace store: only traces logged from the first one "
                                      "this policy version answered on")
    scored: bool = Field(False, description="data= a trace store: only traces with a score (a verifier's or a user's)")
    source: str | None = Field(None, description="data= a trace store: only traces whose verdict came from this "
                               "source (user, verifier)")
    train_traces: str | None = Field(None, description="data= a trace store: a JSON list of trace ids (or an "
                                     "object with one as trace_ids), the only logged answers the train role takes "
                                     "(an `evolve` round's window)")


class VerifierKeys(Keys):
    verifier: str = Field(
        "auto", description="auto (code for tasks with tests, numeric for numeric answers, else name one), "
        "a short name (numeric, math, code, exact, regex, choice) or a dotted import path")


class FeedbackKeys(VerifierKeys):
    """What happens between attempts: the critic, and how many attempts."""

    critic: str = Field("none", pattern="^(none|self|verifier|judge)$",
                        description="who critiques between turns: none (SCoRe's instruction) | self | verifier | judge")
    judge: str | None = Field(None, description="critic=judge: a model directory, `tiny`, or an http(s):// endpoint")
    reveal_reference: bool = Field(False, description="critic=verifier: include the expected answer in the critique")
    memory: int = Field(3, ge=0, description="earlier critiques carried into later turns (Reflexion-style), at most")
    critique_prompt: str | None = Field(
        None, description="override the critique template (needs {question} and {answer}; {notes} optional)"
    )
    max_turns: int = Field(2, ge=1, description="attempts per task in evaluation")


class ProtocolKeys(Keys):
    """How an evaluation is reported (selfevolve/evaluation/protocol.py): intervals and the equal-budget baselines."""

    baseline_temperature: float = Field(1.0, gt=0, description="temperature of the k independent first-turn samples "
                                        "behind maj@k / pass@k (k = max_turns; 1 = the model's own distribution)")
    bootstrap: int = Field(2000, ge=100, description="paired bootstrap resamples behind each 95% interval (seeded)")


class RecipeConfig(ModelKeys, DataKeys, FeedbackKeys, ProtocolKeys):
    """Keys every recipe shares (`selfevolve run recipe=NAME`): the groups above, plus the
    run directory, the learner's base and the held-out evaluation."""

    recipe: str = Field("", description="recipe name")

    def train_limit(self) -> int | None:
        """How many tasks of its train split the recipe reads (the first ones); None: all."""
        return getattr(self, "train_tasks", None)
    max_new_tokens: int = Field(64, ge=1, description="generation budget per turn (rollouts and evaluations)")
    base_model: str | None = Field(
        None,
        description="the learner's base weights (a directory or `tiny`) when the served model's are not "
        "local; default: the served model's",
    )
    run_dir: str | None = Field(None, description="output directory (default runs/<recipe>-<timestamp>)")
    resume: bool = Field(False, description="continue a killed run in run_dir")
    eval_split: str = Field("test", description="test split: evaluated before training and, for the selected "
                            "model, once at the end")
    eval_data: str | None = Field(None, description="test tasks from another file (else the source's split or a slice)")
    eval_limit: int = Field(500, ge=1, description="test tasks per evaluation")
    val_split: str = Field("validation", description="validation split: every evaluation during the run, "
                           "selection and early stopping")
    val_data: str | None = Field(None, description="validation tasks from another file (else the source's split "
                                 "or a slice)")
    val_limit: int = Field(500, ge=1, description="validation tasks per evaluation")
    nproc: int = Field(1, ge=1, description="learner processes, data-parallel (torchrun; one per GPU, gloo on CPU): "
                       "each samples and trains its shard of every batch")
    micro_batch_size: int | None = Field(
        None, ge=1, description="sequences per forward/backward pass; gradients accumulate to the full batch "
        "(null: chosen from the batch so a pass's saved activations stay within 256 MiB, "
        "training.ACTIVATION_BUDGET). Less memory, the same update")
    gradient_checkpointing: bool = Field(
        True, description="recompute activations in backward: a layer keeps only its input (about 1/16 of "
        "the memory, SmolLM2), for ~1/3 more compute (1/8 on tiny); the same numbers")
    logger: str = Field(
        "jsonl", description="also log to: tensorboard | wandb | trackio | mlflow (comma-separated; jsonl is always on)"
    )

    @field_validator("logger")
    @classmethod
    def _known_loggers(cls, v: str) -> str:
        from selfevolve.trackers import TRACKERS

        bad = [n for n in v.split(",") if n.strip() not in TRACKERS]
        if bad:
            raise ValueError(f"unknown logger {bad[0].strip()!r}; choose from {', '.join(TRACKERS)}")
        return v


def parse_overrides(args: list[str]) -> dict[str, str]:
    """`["lr=1e-4", "resume=true"]` -> {"lr": "1e-4", "resume": "true"}. Values stay text
    here; `build` parses each one for its field's type."""
    out: dict[str, str] = {}
    for a in args:
        if "=" not in a or a.startswith("="):
            raise UserError(f"expected key=value, got {a!r}")
        k, v = a.split("=", 1)
        out[k] = v
    return out


def _is_text(field) -> bool:
    ann = field.annotation
    return ann is str or (typing.get_origin(ann) in (typing.Union, types.UnionType) and str in typing.get_args(ann))


def _coerce(field, value: Any) -> Any:
    """Text from the command line is parsed as a YAML scalar/list (`[1,2]`, `true`, `1e-4`)
    unless the field is text; YAML scalars given to a text field become text (`42`)."""
    if _is_text(field):
        return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    if isinstance(value, str):
        try:
            return yaml.safe_load(value) if value != "" else value
        except yaml.YAMLError:
            return value
    return value


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def build(cls: type[BaseModel], values: dict[str, Any], where: str = "command line") -> BaseModel:
    """Validate `values` into `cls`, turning pydantic's report into one line."""
    valid = [f.alias or name for name, f in cls.model_fields.items()]
    for k in values:
        if k not in valid:
            raise UserError(f"unknown key {k!r} ({where}){_suggest(k, valid)}")
    fields = {f.alias or n: f for n, f in cls.model_fields.items()}
    values = {k: _coerce(fields[k], v) for k, v in values.items()}
    try:
        return cls(**values)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        if not key:  # a check across keys (a model validator): its message names them
            raise UserError(f"{err['msg'].removeprefix('Value error, ')} ({where})") from None
        raise UserError(
            f"bad value for {key}={json.dumps(err.get('input'), default=str)} ({where}): {err['msg']}"
        ) from None


def load_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of key: value")
    return data


def resolve(cls: type[RecipeConfig], yaml_path: Path | None, overrides: dict[str, Any]) -> RecipeConfig:
    """Class defaults < YAML < overrides. A `config=PATH` override names another YAML."""
    overrides = dict(overrides)
    if "config" in overrides:
        yaml_path = Path(str(overrides.pop("config")))
    values = load_yaml(yaml_path) if yaml_path is not None else {}
    for k in values:
        if k not in cls.model_fields:
            raise UserError(f"unknown key {k!r} in {yaml_path}{_suggest(k, list(cls.model_fields))}")
    values.update(overrides)
    return build(cls, values)


def help_text(cls: type[BaseModel]) -> str:
    """One line per key: name, default, description."""
    lines = []
    for name, f in cls.model_fields.items():
        name = f.alias or name
        default = f.default if f.default is not None else "null"
        lines.append(f"  {name}={default!s:<14} {f.description or ''}")
    return "\n".join(lines)
