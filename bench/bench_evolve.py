"""The closed loop on tiny, measured as a user runs it: `selfevolve serve`, traffic from
examples/traffic.py (800 arith questions a wave through the `openai` client, half with a
reference, user verdicts for a quarter of the rest), and `selfevolve evolve recipe=rest_em
every=500 rounds=3` against it, a new wave after each round. All the while 32 clients keep
asking (greedy, max_tokens=32, one request after another with a 0.2 s pause) for the model
`evolved` once the server lists it, else the base model: latency idle (before evolve
starts) against during the rounds, every failed request counted — a promotion is an
in-place swap under their feet. Then the held-out traffic (the store's test role, never
trained on or gated on) is scored, base model against `evolved`, paired.

Run twice, side by side: with one queue for everyone (`request_priority=0 nice=0`: the
round's requests take turns with the users') and as evolve runs by default (the round's
requests at priority 1, its process at niceness 10).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import openai

from selfevolve.data import arith
from selfevolve.serving.process import ServerProcess

CLIENTS, PAUSE_S, IDLE_S, MAX_TOKENS = 32, 0.2, 30.0, 32
TRAFFIC = str(Path(__file__).parent.parent / "examples" / "traffic.py")


class Clients:
    """CLIENTS threads asking until stopped; latencies and failures by phase."""

    def __init__(self, client):
        self.client, self.phase, self.stop = client, "idle", threading.Event()
        self.latency: dict[str, list[float]] = {"idle": [], "rounds": []}
        self.failed: list[str] = []
        self.prompts = [t.prompt for t in arith.tasks("test", n=64, seed=11)]
        self.threads = [threading.Thread(target=self.ask, args=(i,)) for i in range(CLIENTS)]

    def ask(self, i: int) -> None:
        k = i
        while not self.stop.is_set():
            model = "evolved" if "evolved" in {m.id for m in self.client.models.list().data} else "tiny"
            phase, t0 = self.phase, time.perf_counter()
            try:
                self.client.chat.completions.create(model=model, temperature=0, max_tokens=MAX_TOKENS, messages=[
                    {"role": "user", "content": self.prompts[k % len(self.prompts)]}])
                self.latency[phase].append(time.perf_counter() - t0)
            except Exception as e:  # counted, not raised: the benchmark reports failures
                self.failed.append(f"{model}: {e!r}"[:200])
            k += CLIENTS
            self.stop.wait(PAUSE_S)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join()


def _pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100)[q - 1] if len(xs) > 1 else float("nan")


def _traffic(*args: str) -> dict:
    out = subprocess.run([sys.executable, TRAFFIC, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def closed_loop(*keys: str) -> dict:
    """One run of the loop under load with evolve's extra `keys`."""
    with tempfile.TemporaryDirectory() as tmp:
        traces, run_dir = f"{tmp}/traces.sqlite", Path(tmp) / "evolve"
        server = ServerProcess("model=tiny", "verifier=numeric", f"traces={traces}")
        url = server.url + "/v1"
        try:
            _traffic("send", "--url", url, "--n", "800", "--offset", "0")
            client = openai.OpenAI(base_url=url, api_key="-", max_retries=0, timeout=600)
            with Clients(client) as clients:
                time.sleep(IDLE_S)
                clients.phase = "rounds"
                t0 = time.perf_counter()
                evolve = subprocess.Popen([sys.executable, "-m", "selfevolve.cli", "evolve", f"model={url}",
                                           f"traces={traces}", "recipe=rest_em", "every=500", "rounds=3", "poll_s=2",
                                           f"run_dir={run_dir}", *keys], stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True)
                for k in (1, 2):  # a new wave once round k-1 is recorded
                    while (json.loads((run_dir / "state.json").read_text())["round"] if (run_dir / "state.json")
                           .exists() else 0) < k and evolve.poll() is None:
                        time.sleep(2)
                    _traffic("send", "--url", url, "--n", "800", "--offset", str(800 * k))
                out = evolve.communicate()[0]
                took = time.perf_counter() - t0
            if evolve.returncode != 0:
                raise RuntimeError(f"evolve failed: {out[-2000:]}")
            score = _traffic("score", "--url", url, "--traces", traces)
            lineage = json.loads((run_dir / "lineage.json").read_text())
        finally:
            server.stop()
    idle, busy = clients.latency["idle"], clients.latency["rounds"]
    return {"idle": idle, "busy": busy, "took": took, "failed": clients.failed, "score": score,
            "rounds": [n for n in lineage["nodes"] if n["id"] != "base"]}


def run() -> dict:
    rows, ratios = [], []
    for label, keys in (("one queue", ("request_priority=0", "nice=0")), ("users first (default)", ())):
        r = closed_loop(*keys)
        idle, busy, score = r["idle"], r["busy"], r["score"]
        decisions = ", ".join(f"{n['id']} {n['decision']} ({n['current']:.3f} -> {n['candidate']:.3f})"
                              for n in r["rounds"])
        rows += [
            (f"{label}: idle, 32 clients", f"p50 {_pct(idle, 50) * 1e3:.0f} ms, p99 {_pct(idle, 99) * 1e3:.0f} ms",
             f"{len(idle)} requests in {IDLE_S:.0f} s"),
            (f"{label}: during 3 rounds", f"p50 {_pct(busy, 50) * 1e3:.0f} ms, p99 {_pct(busy, 99) * 1e3:.0f} ms",
             f"{len(busy)} requests in {r['took']:.0f} s; failed: {len(r['failed'])}"
             + (f" (first: {r['failed'][0]})" if r["failed"] else "")),
            (f"{label}: gate decisions", str(sum(n["decision"] == "promoted" for n in r["rounds"])) + " promoted",
             decisions),
            (f"{label}: held-out traffic acc_t1", f"{score['base_acc_t1']:.3f} -> {score['evolved_acc_t1']:.3f}",
             f"gain {score['gain']:+.3f}, 95% [{score['interval'][0]:+.3f}, {score['interval'][1]:+.3f}], "
             f"{score['tasks']} tasks"),
        ]
        ratios += [(f"{label}: p50 during rounds / idle", _pct(busy, 50) / _pct(idle, 50)),
                   (f"{label}: p99 during rounds / idle (target <= 2)", _pct(busy, 99) / _pct(idle, 99)),
                   (f"{label}: failed requests", str(len(r["failed"]))),
                   (f"{label}: time for 3 rounds", f"{r['took']:.0f} s")]
    return {"title": "evolve: the closed loop under load (tiny, rest_em, 3 rounds)", "doc": __doc__.strip(),
            "rows": rows, "ratios": ratios}


if __name__ == "__main__":
    r = run()
    for row in r["rows"]:
        print(" | ".join(row))
