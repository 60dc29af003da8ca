"""Kill a recipe run with SIGKILL at a random moment after its first checkpoint (or stop it
with SIGINT), resume it, and compare with an uninterrupted run: the same summary.json and
the same number of traces."""

import json
import random
import signal
import subprocess
import time

from selfevolve.store import TraceStore
from tests.test_cli import EXE, cli


def check_kill_and_resume(args: list[str], tmp_path) -> tuple:
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert cli("run", *args, f"run_dir={whole}").returncode == 0
    proc = subprocess.Popen([EXE, "run", *args, f"run_dir={cut}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (cut / "checkpoint" / "state.pt").exists():
        time.sleep(0.02)
    delay = random.uniform(0.0, 0.6)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (cut / "summary.json").exists(), f"the run finished before it could be killed ({delay:.2f} s)"
    _resume_and_compare(args, whole, cut, f"killed {delay:.2f} s after the first checkpoint")
    return whole, cut


def check_sigint_and_resume(args: list[str], tmp_path) -> None:
    """Ctrl-C once the first training line is logged: the run writes a checkpoint, exits 130
    naming the resume command, and resuming it ends as an uninterrupted run does."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert cli("run", *args, f"run_dir={whole}").returncode == 0
    proc = subprocess.Popen([EXE, "run", *args, f"run_dir={cut}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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
