"""Kill a recipe run with SIGKILL at a random moment after its first checkpoint, or at a
chosen point (or stop it with SIGINT), resume it, and compare with an uninterrupted run:
the same summary.json and the same number of traces."""

import json
import random
import signal
import subprocess
import time

import torch

from selfevolve.data.store import TraceStore
from tests.test_cli import EXE, cli


def check_kill_and_resume(args: list[str], tmp_path) -> tuple:
    """SIGKILL at a random moment between the first checkpoint and the end: the moment is
    drawn from the time the uninterrupted run took from there to its summary; one that lands
    after the end (a loaded machine runs faster or slower) is drawn again from half the window."""
    whole = tmp_path / "whole"
    t0 = time.time()
    assert cli("run", *args, f"run_dir={whole}").returncode == 0
    window = (whole / "summary.json").stat().st_mtime - t0  # the report is written after it
    for attempt in range(4):
        cut = tmp_path / f"cut{attempt}"
        t0 = time.monotonic()
        proc = subprocess.Popen([EXE, "run", *args, f"run_dir={cut}"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while time.time() < deadline and not (cut / "checkpoint" / "state.pt").exists():
            time.sleep(0.005)
        delay = random.uniform(0.0, 0.7 * max(0.0, window - (time.monotonic() - t0)))
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if not (cut / "summary.json").exists():
            _resume_and_compare(args, whole, cut, f"killed {delay:.2f} s after the first checkpoint")
            return whole, cut
        window /= 2
    raise AssertionError("the run finished before it could be killed, 4 times")


def check_kill_at_and_resume(args: list[str], tmp_path, at) -> None:
    """SIGKILL at a chosen point: `at(metrics_lines, checkpoint_state)` is polled while the run
    goes; when it holds, the run is frozen (SIGSTOP), the point is checked again on the frozen
    files, and the run is killed. Deterministic: the kill lands exactly where `at` says."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert cli("run", *args, f"run_dir={whole}").returncode == 0
    proc = subprocess.Popen([EXE, "run", *args, f"run_dir={cut}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not at(*_observe(cut)):
        time.sleep(0.002)
    proc.send_signal(signal.SIGSTOP)
    assert at(*_observe(cut)), "the run went past the point before it was frozen"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _resume_and_compare(args, whole, cut, "killed at the chosen point")


def _observe(run_dir):
    lines = [json.loads(x) for x in _read(run_dir / "metrics.jsonl").splitlines() if x.strip().endswith("}")]
    state = run_dir / "checkpoint" / "state.pt"
    return lines, (torch.load(state, weights_only=False)["recipe_state"] if state.exists() else None)


def check_sigint_and_resume(args: list[str], tmp_path) -> None:
    """Ctrl-C once the first training line is logged: the run writes a checkpoint, exits 130
    naming the resume command, and resuming it ends as an uninterrupted run does."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert cli("run", *args, f"run_dir={whole}").returncode == 0
    proc = subprocess.Popen([EXE, "run", *args, f"run_dir={cut}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 300
    while time.time() < deadline and '"step"' not in _read(cut / "metrics.jsonl"):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "stopping at the next checkpoint" in err and "resume=true" in err and "Traceback" not in err
    assert (cut / "checkpoint" / "state.pt").exists() and not (cut / "summary.json").exists()
    _resume_and_compare(args, whole, cut, "stopped with SIGINT")


def _read(path) -> str:
    return path.read_text() if path.exists() else ""


def _resume_and_compare(args, whole, cut, what: str) -> None:
    r = cli("run", *args, f"run_dir={cut}", "resume=true")
    assert r.returncode == 0, r.stderr
    assert json.loads((cut / "summary.json").read_text()) == json.loads((whole / "summary.json").read_text()), what
    assert TraceStore(cut / "traces.sqlite").count() == TraceStore(whole / "traces.sqlite").count(), what
