"""Kill a recipe run with SIGKILL after its first checkpoint, resume it, and compare with an
uninterrupted run: the same summary.json and the same number of traces."""

import json
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
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (cut / "summary.json").exists(), "the run finished before it could be killed"
    r = cli("run", *args, f"run_dir={cut}", "resume=true")
    assert r.returncode == 0, r.stderr
    assert json.loads((cut / "summary.json").read_text()) == json.loads((whole / "summary.json").read_text())
    assert TraceStore(cut / "traces.sqlite").count() == TraceStore(whole / "traces.sqlite").count()
    return whole, cut
