"""The `selfevolve` command.

    selfevolve run recipe=NAME key=value ...     run a recipe into a run directory
    selfevolve eval key=value ...                 evaluate a model on held-out tasks
    selfevolve refine prompt="..." key=value ...  self-refine one prompt
    selfevolve check data=... verifier=...        run the verifier on every task's reference
    selfevolve serve model=... port=8000          OpenAI-compatible server (plain or self-refining)
    selfevolve evolve model=URL traces=... recipe= train the served model on its logged traffic, gated rounds
    selfevolve traces RUN_DIR key=value ...       list, filter, show and export a run's traces
    selfevolve report RUN_DIR [RUN_DIR ...]       HTML report with plots (several runs overlaid)
    selfevolve compare RUN_A RUN_B                paired difference B − A of two runs' test metrics, with intervals
    selfevolve recipes                            list the recipes

Every command takes `key=value` words, validated by a pydantic config; `--help` lists the
keys. Bad input prints one line and exits 2 (`debug=true` shows the traceback). Each
command imports what it needs when it runs (torch, transformers, FastAPI take seconds), so
`--help` and a typo answer at once.
"""

from __future__ import annotations

import difflib
import importlib
import json
import os
import signal
import sqlite3
import sys
import warnings
from importlib.resources import files
from pathlib import Path

from pydantic import Field

from selfevolve.config import (
    DataKeys,
    FeedbackKeys,
    ModelKeys,
    ProtocolKeys,
    VerifierKeys,
    build,
    help_text,
    parse_overrides,
    resolve,
)
from selfevolve.errors import NonFinite, SyncError, UserError, disk_full
from selfevolve.types import SamplingParams

# recipe name -> (module, config class). One dict of short names (docs/architecture.md).
RECIPES = {
    "pretrain": ("selfevolve.recipes.pretrain", "PretrainConfig"),
    "rest_em": ("selfevolve.recipes.rest_em", "RestEMConfig"),
    "star": ("selfevolve.recipes.star", "StarConfig"),
    "score": ("selfevolve.recipes.score", "ScoreConfig"),
    "spin": ("selfevolve.recipes.spin", "SpinConfig"),
    "self_evolve": ("selfevolve.recipes.self_evolve", "SelfConfig"),
}

USAGE = __doc__.split("\n\n")[1]


class EvalConfig(ModelKeys, DataKeys, FeedbackKeys, ProtocolKeys):
    split: str | None = Field(None, description="split or role to evaluate (train|validation|test carve a flat file "
                              "as a recipe does); default: test of a generated suite or a split source, all of a "
                              "flat file")
    limit: int = Field(500, ge=1, description="number of tasks")
    adapter: str | None = Field(None, description="LoRA adapter directory to evaluate with")
    out: str | None = Field(None, description="write the metrics as JSON to this file")


class RefineConfig(ModelKeys, FeedbackKeys):
    prompt: str = Field(..., description="the prompt to answer and refine")
    reference: str | None = Field(None, description="gold answer; enables the verifier and its stop rule")
    max_turns: int = Field(3, ge=1, description="attempts at most")
    temperature: float = Field(0.0, ge=0, description="0 = greedy")
    adapter: str | None = Field(None, description="LoRA adapter directory")
    as_json: bool = Field(False, alias="json", description="print the whole trace as JSON")


def _recipe(name: str):
    if name not in RECIPES:
        close = difflib.get_close_matches(name, list(RECIPES), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UserError(f"unknown recipe={name!r}{hint} (see `selfevolve recipes`)")
    mod_name, cls_name = RECIPES[name]
    mod = importlib.import_module(mod_name)
    return mod, getattr(mod, cls_name)


def _config_path(name: str) -> Path:
    return Path(str(files("selfevolve.recipes.configs") / f"{name}.yaml"))


def cmd_run(overrides: dict, want_help: bool) -> int:
    import torch

    from selfevolve.run import Run, Stopped

    name = overrides.pop("recipe", None)
    if name is None:
        raise UserError("run needs recipe=NAME (see `selfevolve recipes`)")
    mod, cls = _recipe(str(name))
    if want_help:
        print(f"selfevolve run recipe={name} key=value ...\n\n{mod.__doc__.strip()}\n\nkeys:\n{help_text(cls)}\n"
              f"  seeds=null          run once per seed into RUN_DIR/seed-S and write mean ± std (seeds=0,1,2)")
        return 0
    if "seeds" in overrides:
        from selfevolve.evaluation.seeds import parse_seeds, run_seeds

        seeds = parse_seeds(overrides.pop("seeds"))
        resolve(cls, _config_path(str(name)), {**overrides, "recipe": name})  # every key checked before seed 0 runs
        return run_seeds(str(name), seeds, overrides, lambda o: cmd_run({**o, "recipe": name}, False))
    cfg = resolve(cls, _config_path(str(name)), {**overrides, "recipe": name})
    if cfg.nproc > 1 and not getattr(mod, "DATA_PARALLEL", False):
        data_parallel = ", ".join(n for n in RECIPES if getattr(_recipe(n)[0], "DATA_PARALLEL", False))
        raise UserError(f"nproc={cfg.nproc}: recipe={name} runs in one process (data-parallel: {data_parallel})")
    if cfg.nproc > 1 and "WORLD_SIZE" not in os.environ:  # every key is checked; now start the ranks
        from selfevolve.run import check_run_dir

        if cfg.run_dir:
            check_run_dir(cfg, Path(cfg.run_dir))  # a bad run_dir is exit 2 here, not a failed rank
        return _torchrun(cfg.nproc, {**overrides, "recipe": name})
    from selfevolve.training import distributed

    distributed.init()
    if distributed.world() != cfg.nproc:
        raise UserError(f"nproc={cfg.nproc}, but torchrun started {distributed.world()} processes: "
                        f"pass nproc={distributed.world()}")
    torch.manual_seed(cfg.seed)
    run = Run(cfg)
    previous = signal.signal(signal.SIGINT, run.request_stop)
    try:
        mod.main(cfg, run)
    except Stopped as e:
        print(f"selfevolve run: {e}", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, previous)
        run.trackers.close()
    print(f"run directory: {run.dir}")
    return 0


def _torchrun(nproc: int, overrides: dict) -> int:
    """`selfevolve run ... nproc=N` is `torchrun --standalone --nproc-per-node=N -m
    selfevolve.cli run ...` (one node; several nodes: call torchrun yourself with its
    rendezvous flags and nproc=WORLD_SIZE). Its exit status is torchrun's."""
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "selfevolve.cli", "run", *(f"{k}={v}" for k, v in overrides.items())]
    return subprocess.call(cmd)


def cmd_eval(overrides: dict, want_help: bool) -> int:
    from selfevolve.build import critic_from_config, served_policy, verifier_for
    from selfevolve.data.sources import GENERATED, splits_of, tasks_for
    from selfevolve.evaluation.evaluate import evaluate
    from selfevolve.evaluation.protocol import feedback_kind
    from selfevolve.files import atomic_write
    from selfevolve.run import print_summary

    if want_help:
        print(f"selfevolve eval key=value ...\n\nGreedy evaluation with the protocol: SCoRe's metrics with 95% "
              f"intervals, p_flip, maj@k / pass@k at the same budget, and the feedback label.\n\n"
              f"keys:\n{help_text(EvalConfig)}")
        return 0
    cfg = build(EvalConfig, overrides)
    _threads(cfg)
    tasks = tasks_for(cfg, cfg.split, cfg.limit, holdout=False)
    verifier = verifier_for(cfg.verifier, tasks, cfg.verify_workers)
    if cfg.out:
        _check_writable(cfg.out)
    policy = served_policy(cfg, adapter=cfg.adapter)
    metrics, _, _ = evaluate(policy, tasks, verifier, max_turns=cfg.max_turns,
                             critic=critic_from_config(cfg, policy, verifier),
                             sampling=SamplingParams(temperature=0.0, max_new_tokens=cfg.max_new_tokens),
                             feedback=feedback_kind(cfg.critic), baseline_temperature=cfg.baseline_temperature,
                             seed=cfg.seed, bootstrap=cfg.bootstrap)
    split = cfg.split or ("test" if cfg.data in GENERATED or splits_of(cfg.data) else "all")
    metrics = {"model": cfg.model, "adapter": cfg.adapter, "data": cfg.data, "split": split, **metrics}
    print_summary(f"{cfg.model} on {cfg.data}:{metrics['split']}", None, metrics)
    if cfg.out:
        atomic_write(Path(cfg.out), json.dumps(metrics, indent=2) + "\n")
    return 0


def cmd_refine(overrides: dict, want_help: bool) -> int:
    from selfevolve.build import critic_from_config, refine, served_policy, verifier_for
    from selfevolve.turns import Critique, Instruction
    from selfevolve.types import Task

    if want_help:
        print(
            f'selfevolve refine prompt="..." key=value ...\n\nAnswer, then revise.\n\nkeys:\n{help_text(RefineConfig)}'
        )
        return 0
    cfg = build(RefineConfig, overrides)
    _threads(cfg)
    task = Task(id="prompt", prompt=cfg.prompt, reference=cfg.reference)
    verifier = verifier_for(cfg.verifier, [task]) if cfg.reference is not None else None
    policy = served_policy(cfg, adapter=cfg.adapter)
    critic, window = critic_from_config(cfg, policy, verifier), cfg.memory or None
    trace = refine(
        task,
        policy,
        verifier=verifier,
        critic=Critique(critic, window) if critic is not None else Instruction(window=window),
        max_turns=cfg.max_turns,
        sampling=SamplingParams(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed),
    )
    print(trace.model_dump_json(indent=2) if cfg.as_json else trace.final)
    return 0


class CheckConfig(DataKeys, VerifierKeys):
    verify_workers: int = Field(2, ge=1, description="verifier worker processes")
    split: str | None = Field(None, description="split or role to check (default: every task of a flat file)")
    limit: int | None = Field(None, ge=1, description="check only the first N tasks")
    timeout: float = Field(30.0, gt=0, description="seconds per task before it counts as failed")
    out: str | None = Field(None, description='write {"passed": N, "total": M, "failures": [...]} to this file')


def cmd_check(overrides: dict, want_help: bool) -> int:
    """The sanity check before spending GPU hours on a new dataset: does the verifier
    accept every task's own reference answer?"""
    from selfevolve.build import verifier_for
    from selfevolve.data.sources import tasks_for
    from selfevolve.files import atomic_write
    from selfevolve.verifiers import VerifierPool

    if want_help:
        print(f"selfevolve check data=... verifier=...\n\n{cmd_check.__doc__}\n\nkeys:\n{help_text(CheckConfig)}")
        return 0
    cfg = build(CheckConfig, overrides)
    tasks = tasks_for(cfg, cfg.split, cfg.limit, holdout=False)
    verifier = verifier_for(cfg.verifier, tasks)
    missing = [t for t in tasks if t.reference is None]
    if missing:
        raise UserError(f"data={cfg.data}: {len(missing)} tasks have no reference in field {cfg.answer_field!r} "
                        f"({missing[0].id}, ...); set answer_field= (other fields: {sorted(missing[0].meta)})")
    if cfg.out:
        _check_writable(cfg.out)
    render = getattr(verifier, "reference_response", lambda t: f"The answer is {t.reference}.")
    with VerifierPool(verifier, workers=cfg.verify_workers, timeout=cfg.timeout) as pool:
        feedback = pool.map(tasks, [render(t) for t in tasks])
    failures = [{"task_id": t.id, "text": fb.text} for t, fb in zip(tasks, feedback) if (fb.score or 0) < 1.0]
    result = {"passed": len(tasks) - len(failures), "total": len(tasks), "failures": failures}
    for f in failures[:20]:
        print(f"FAIL {f['task_id']}: {(f['text'] or '').splitlines()[0][:120]}")
    print(f"{result['passed']}/{result['total']} references pass verifier={cfg.verifier}")
    if cfg.out:
        atomic_write(Path(cfg.out), json.dumps(result, indent=2) + "\n")
    return 0


def cmd_recipes(overrides: dict, want_help: bool) -> int:
    for name in RECIPES:
        mod, _ = _recipe(name)
        first = mod.__doc__.strip().splitlines()[0]
        print(f"{name:<12} {first.split('—', 1)[-1].strip()}")
    return 0


def _threads(cfg) -> None:
    import torch

    torch.set_num_threads(cfg.threads)


def _check_writable(path: str) -> None:
    parent = Path(path).expanduser().resolve().parent
    if not parent.is_dir():
        raise UserError(f"out={path}: directory {parent} does not exist")


def cmd_serve(overrides: dict, want_help: bool) -> int:
    from selfevolve.serving.app import serve
    from selfevolve.serving.server import ServeConfig

    if want_help:
        from selfevolve.serving import app as mod

        print(f"selfevolve serve key=value ...\n\n{mod.__doc__.strip()}\n\nkeys:\n{help_text(ServeConfig)}")
        return 0
    cfg = build(ServeConfig, overrides)
    _threads(cfg)
    if cfg.model.startswith(("http://", "https://")):  # the gateway in front of an engine (vllm serve, ...)
        from selfevolve.serving.gateway import Gateway

        serve(cfg, Gateway(cfg))
    else:
        serve(cfg)
    return 0


def cmd_evolve(overrides: dict, want_help: bool) -> int:
    from selfevolve import evolve

    if want_help:
        print(f"selfevolve evolve key=value ...\n\n{evolve.__doc__.strip()}\n\nkeys (others go to the recipe):\n"
              f"{help_text(evolve.EvolveConfig)}")
        return 0
    evolve.main(overrides, _recipe, _config_path)
    return 0


def cmd_traces(overrides: dict, want_help: bool) -> int:
    from selfevolve.data import traces

    if want_help:
        print(f"{traces.__doc__.strip()}\n\nkeys:\n{help_text(traces.TracesConfig)}")
        return 0
    traces.main(build(traces.TracesConfig, overrides))
    return 0


def cmd_compare(overrides: dict, want_help: bool) -> int:
    from selfevolve.evaluation import compare

    if want_help:
        print(f"{compare.__doc__.strip()}\n\nkeys:\n{help_text(compare.CompareConfig)}")
        return 0
    if len(json.loads(overrides.get("runs", "[]"))) != 2:
        raise UserError("compare needs two run directories: selfevolve compare RUN_A RUN_B")
    cfg = build(compare.CompareConfig, overrides)
    if cfg.out:
        _check_writable(cfg.out)
    compare.main(cfg)
    return 0


def cmd_report(overrides: dict, want_help: bool) -> int:
    from selfevolve.evaluation import report

    if want_help:
        print(f"{report.__doc__.strip()}\n\nkeys:\n{help_text(report.ReportConfig)}")
        return 0
    if "runs" not in overrides:
        raise UserError("report needs at least one run directory: selfevolve report RUN_DIR [RUN_DIR ...]")
    report.main(build(report.ReportConfig, overrides))
    return 0


COMMANDS = {"traces": cmd_traces, "report": cmd_report, "compare": cmd_compare, "run": cmd_run, "eval": cmd_eval,
            "refine": cmd_refine, "check": cmd_check, "recipes": cmd_recipes, "serve": cmd_serve,
            "evolve": cmd_evolve}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(f"usage:\n{USAGE}\n\n`selfevolve COMMAND --help` lists a command's keys.")
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "traces" and rest and "=" not in rest[0] and not rest[0].startswith("-"):
        rest = [f"run_dir={rest[0]}", *rest[1:]]  # `selfevolve traces RUN_DIR ...`
    if cmd in ("report", "compare"):  # `selfevolve report A B ...`: the words without `=` are run directories
        runs = [a for a in rest if "=" not in a and not a.startswith("-")]
        rest = [a for a in rest if a not in runs] + ([f"runs={json.dumps(runs)}"] if runs else [])
    want_help = any(a in ("-h", "--help") for a in rest)
    rest = [a for a in rest if a not in ("-h", "--help")]
    debug = any(a.lower() in ("debug=true", "debug=1") for a in rest)
    from selfevolve.progress import enabled

    if not enabled():  # quiet where nobody watches: transformers' loading bars too
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        if "transformers" in sys.modules:  # already imported (main() called in-process): tell it directly
            sys.modules["transformers"].utils.logging.disable_progress_bar()
    # peft calls a transformers API that warns of its own deprecation; nothing a user can act on
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    try:
        if cmd not in COMMANDS:
            raise UserError(f"unknown command {cmd!r}; commands: {', '.join(COMMANDS)}")
        return COMMANDS[cmd](parse_overrides(rest), want_help)
    except UserError as e:
        if debug:
            raise
        print(f"selfevolve {cmd}: error: {e}", file=sys.stderr)
        return 2
    except (NonFinite, SyncError) as e:  # the run stopped before serving a broken update
        if debug:
            raise
        print(f"selfevolve {cmd}: error: {e}; the last checkpoint is intact (resume=true continues from it)",
              file=sys.stderr)
        return 1
    except (OSError, sqlite3.OperationalError) as e:
        # Disk full (or a quota, or a file-size limit) while writing: say so in one line.
        # Every write of a run is atomic or rolled back, so what is on disk stays readable.
        if debug or not disk_full(e):
            raise
        where = getattr(e, "filename", None) or "the trace store"
        print(
            f"selfevolve {cmd}: error: could not write {where} ({getattr(e, 'strerror', None) or e}); disk full? "
            f"Free space and rerun with resume=true: the run continues from its last checkpoint",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print(f"selfevolve {cmd}: interrupted; a run continues from its last checkpoint with resume=true",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
