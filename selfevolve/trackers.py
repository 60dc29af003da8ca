"""Experiment trackers (`logger=`): metrics.jsonl is always written; `logger=tensorboard`,
`wandb`, `trackio`, `mlflow` (or several, comma-separated) also send every logged line
to that tracker. Each is an optional extra (`pip install "selfevolve[wandb]"`), imported
only when selected.

The same metric names everywhere: an evaluation line `{"eval": "step-40", "acc_t1": ...}`
becomes `eval/acc_t1`, any other line's numbers become `train/<key>` (`train/reward_t2`,
`train/kl_t2`, `train/loss`, `train/kept`, `train/time_generate`). The x-axis is the line's
`step` (SCoRe, SPIN, pretraining) or else its `round` / `iteration` / `phase`. Text
values (a stage name, a warning) stay in metrics.jsonl only.

Where they write, unless the tracker's own environment variable says otherwise:
tensorboard → RUN_DIR/tensorboard; wandb → RUN_DIR/wandb (set WANDB_MODE=offline to work
without an account); mlflow → MLFLOW_TRACKING_URI, else SQLite in RUN_DIR/mlflow.db;
trackio → TRACKIO_DIR, else trackio's own default (so `trackio show` finds it).
A resumed run logs the redone work again to the trackers (metrics.jsonl is rolled back
exactly; the trackers' own stores cannot be).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

from selfevolve.errors import UserError

# `logger=` names; each but jsonl is also the package (and the extra) that provides it.
TRACKERS = ("jsonl", "tensorboard", "wandb", "trackio", "mlflow")
X_KEYS = ("step", "round", "iteration", "phase")


def flatten(row: dict[str, Any]) -> tuple[dict[str, float], int | None]:
    """One metrics.jsonl line -> ({tracker name: number}, step)."""
    prefix = "eval" if "eval" in row else "train"
    step = next((int(row[k]) for k in X_KEYS if isinstance(row.get(k), (int, float))), None)
    values = {f"{prefix}/{k}": float(v) for k, v in row.items()
              if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in X_KEYS}
    return values, step


def _need(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        raise UserError(f"logger={name} needs the {name} package: pip install \"selfevolve[{name}]\"") from None


class TensorBoardTracker:
    def __init__(self, run_dir: Path, name: str, config: dict):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in config.items()))

    def log(self, values: dict[str, float], step: int | None) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, run_dir: Path, name: str, config: dict):
        import wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "selfevolve"), name=name, config=config,
                              dir=str(run_dir), id=name, resume="allow")

    def log(self, values: dict[str, float], step: int | None) -> None:
        self.run.log({**values, **({"step": step} if step is not None else {})})

    def close(self) -> None:
        self.run.finish()


class TrackioTracker:
    def __init__(self, run_dir: Path, name: str, config: dict):
        import trackio
        self.trackio = trackio
        self.trackio.init(project=os.environ.get("TRACKIO_PROJECT", "selfevolve"), name=name, config=config,
                          resume="allow")

    def log(self, values: dict[str, float], step: int | None) -> None:
        self.trackio.log(values, step=step)

    def close(self) -> None:
        self.trackio.finish()


class MLflowTracker:
    def __init__(self, run_dir: Path, name: str, config: dict):
        import mlflow
        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            self.mlflow.set_tracking_uri(f"sqlite:///{(run_dir / 'mlflow.db').resolve()}")
        self.mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "selfevolve"))
        self.run = self.mlflow.start_run(run_name=name)
        self.mlflow.log_params({k: str(v)[:500] for k, v in config.items()})

    def log(self, values: dict[str, float], step: int | None) -> None:
        # MLflow keys allow letters, digits and _-./ only; ours already do.
        self.mlflow.log_metrics(values, step=step or 0)

    def close(self) -> None:
        self.mlflow.end_run()


CLASSES = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "trackio": TrackioTracker, "mlflow": MLflowTracker}


def selected(logger: str) -> list[str]:
    """`"jsonl,tensorboard"` -> ["tensorboard"]; importable, or a one-line UserError (the
    names themselves were checked by RecipeConfig). Called before the run directory is
    claimed, so a missing package costs nothing."""
    names = list(dict.fromkeys(n.strip() for n in logger.split(",") if n.strip() not in ("", "jsonl")))
    for n in names:
        _need(n)
    return names


class Trackers:
    """The trackers of one run: `log(row)` sends a metrics line to each."""

    def __init__(self, logger: str, run_dir: Path, name: str, config: dict):
        self.active = [CLASSES[n](run_dir, name, config) for n in selected(logger)]

    def log(self, row: dict[str, Any]) -> None:
        if self.active:
            values, step = flatten(row)
            if values:
                for t in self.active:
                    t.log(values, step)

    def close(self) -> None:
        for t in self.active:
            t.close()
        self.active = []
