"""`selfevolve report` and the trackers, on a short real SCoRe run: the run writes its own
report, the PNGs are real images the HTML references, several runs overlay, and every
tracker installable on CPU receives the same metric names."""

import json
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from selfevolve.trackers import flatten
from tests.recipes.test_score import SMALL
from tests.test_cli import cli, script

PLOTS = {"accuracy.png", "flips.png", "edit_ratio.png", "reward_kl.png", "loss.png", "time_split.png"}


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """One short SCoRe run logging to every tracker (wandb offline, trackio into tmp)."""
    tmp = tmp_path_factory.mktemp("report")
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "TRACKIO_DIR": str(tmp / "trackio")}
    r = cli("run", *SMALL, f"run_dir={tmp / 'run'}", "logger=jsonl,tensorboard,wandb,trackio,mlflow", env=env)
    assert r.returncode == 0, r.stderr
    return tmp / "run", tmp, r


def _evals(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]


def test_run_writes_its_report(tracked_run):
    run_dir, _, r = tracked_run
    report = run_dir / "report"
    assert f"report: {report / 'report.html'}" in r.stdout
    assert PLOTS <= {p.name for p in report.glob("*.png")}
    html = (report / "report.html").read_text()
    for name in PLOTS:
        with Image.open(report / name) as im:
            im.verify()
            assert im.format == "PNG" and im.size[0] > 300
        assert f'href="{name}"' in html and "data:image/png;base64," in html
    assert "acc_t1" in html and "recipe=score" in html


def test_report_overlays_runs(tracked_run, tmp_path):
    run_dir, _, _ = tracked_run
    other = tmp_path / "other-run"
    shutil.copytree(run_dir, other)
    r = cli("report", str(run_dir), str(other), f"out={tmp_path / 'cmp'}")
    assert r.returncode == 0, r.stderr
    html = (tmp_path / "cmp" / "report.html").read_text()
    assert "other-run" in html and html.count("<h2>") == 3  # two runs + the plots
    assert PLOTS <= {p.name for p in (tmp_path / "cmp").glob("*.png")}


@pytest.mark.parametrize("args,words", [
    (["report"], "at least one run directory"),
    (["report", "/nonexistent/run"], "not found"),
    (["report", "/tmp"], "not a run directory"),
])
def test_report_bad_input(args, words):
    r = cli(*args)
    assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr


def test_flatten_names_and_steps():
    assert flatten({"eval": "step-4", "round": 4, "acc_t1": 0.5, "n": 8}) == ({"eval/acc_t1": 0.5, "eval/n": 8.0}, 4)
    assert flatten({"step": 3, "stage": 1, "reward_t2": 0.25, "warning": "x"}) == (
        {"train/stage": 1.0, "train/reward_t2": 0.25}, 3)
    assert flatten({"iteration": 2, "kept": 10}) == ({"train/kept": 10.0}, 2)


def test_tensorboard_receives_the_metrics(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _, _ = tracked_run
    ea = EventAccumulator(str(run_dir / "tensorboard"))
    ea.Reload()
    evals = _evals(run_dir)
    assert [(e.step, e.value) for e in ea.Scalars("eval/acc_t1")] == [(e["round"], e["acc_t1"]) for e in evals]
    assert len(ea.Scalars("train/reward_t2")) == 3


def test_mlflow_receives_the_metrics(tracked_run):
    from mlflow.tracking import MlflowClient

    run_dir, _, _ = tracked_run
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("selfevolve").experiment_id])
    assert run.info.run_name == "run" and run.data.params["recipe"] == "score"
    history = client.get_metric_history(run.info.run_id, "eval/acc_t1")
    assert sorted((m.step, m.value) for m in history) == sorted((e["round"], e["acc_t1"]) for e in _evals(run_dir))


def test_trackio_receives_the_metrics(tracked_run, monkeypatch):
    run_dir, tmp, _ = tracked_run
    code = (
        "from trackio.sqlite_storage import SQLiteStorage; import json; "
        "print(json.dumps([l.get('eval/acc_t1') for l in SQLiteStorage.get_logs('selfevolve', 'run') "
        "if 'eval/acc_t1' in l]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,  # this interpreter
        env={"TRACKIO_DIR": str(tmp / "trackio"), "HOME": "/tmp", "PATH": "/usr/bin:/bin"},
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [e["acc_t1"] for e in _evals(run_dir)]


def test_wandb_offline_run_holds_the_metrics(tracked_run):
    run_dir, _, _ = tracked_run
    (log,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    out = subprocess.run([script("wandb"), "leet", "inspect", str(log)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count('"eval/acc_t1"') >= len(_evals(run_dir)) and '"train/kl_t2"' in out.stdout


def test_unknown_logger_is_one_line(tmp_path):
    r = cli("run", *SMALL, f"run_dir={tmp_path / 'r'}", "logger=jsonl,neptune")
    assert r.returncode == 2 and "unknown logger 'neptune'" in r.stderr and not (tmp_path / "r").exists()


def test_missing_tracker_package_names_the_extra(tmp_path, monkeypatch):
    from selfevolve.config import build
    from selfevolve.errors import UserError
    from selfevolve.recipes.score import ScoreConfig
    from selfevolve.run import Run
    from selfevolve.trackers import Trackers

    monkeypatch.setitem(sys.modules, "wandb", None)  # what an environment without wandb looks like to import
    with pytest.raises(UserError, match=r'pip install "selfevolve\[wandb\]"'):
        Trackers("jsonl,wandb", tmp_path, "r", {})
    with pytest.raises(UserError, match="wandb"):
        Run(build(ScoreConfig, {"recipe": "score", "run_dir": str(tmp_path / "r"), "logger": "wandb"}))
    assert not (tmp_path / "r").exists()  # nothing claimed: the same command works once wandb is installed
