"""`selfevolve evolve` under what production does to it (issue 32, part 6), all real: the
server and evolve are processes, the traffic is the `openai` client, evolve is killed with
SIGKILL mid-round and the server is SIGKILLed and restarted on its port. Resumed, evolve
redoes the killed round on the same window — no trace trained into the served lineage twice,
none lost, traces logged during the round go to the next — and loads the served version again on the
restarted server, verified by its canary."""

import json
import os
import signal
import subprocess
import time

import openai

from selfevolve.data import arith
from selfevolve.data.store import TraceStore
from selfevolve.serving.process import ServerProcess, free_port
from tests.test_cli import EXE, cli

ROUND = ["recipe=rest_em", "iterations=1", "num_samples=2", "epochs=1", "max_new_tokens=32", "eval_limit=8",
         "val_limit=24", "every=40", "poll_s=0.3"]


def _traffic(client, tasks, model="tiny"):
    for i, task in enumerate(tasks):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": task.prompt}],
                                       temperature=1.0, seed=i, max_tokens=32, extra_body={"reference": task.reference})


def _wait(predicate, timeout=300.0):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.2)


def test_kill_9_mid_round_and_a_restarted_server(tmp_path):
    traces, run = tmp_path / "traces.sqlite", tmp_path / "evolve"
    server = ServerProcess(f"traces={traces}", "verifier=numeric")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0)
    tasks = arith.tasks("train", n=110)
    try:
        _traffic(client, tasks[:60])
        env = {**os.environ, "SELFEVOLVE_QUIET": "1"}
        proc = subprocess.Popen([EXE, "evolve", f"model={server.url}/v1", f"traces={traces}", *ROUND, "rounds=2",
                                 f"run_dir={run}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        _wait(lambda: (run / "round-0" / "config.yaml").exists())
        proc.send_signal(signal.SIGKILL)  # round 0 has started: its window is fixed, nothing is recorded
        proc.wait()
        assert not (run / "state.json").exists()
        _traffic(client, tasks[60:105])  # logged after round 0 started: round 1's
        window0 = json.loads((run / "windows" / "round-0.json").read_text())
        assert len(window0["trace_ids"]) == 60

        r = cli("evolve", f"model={server.url}/v1", f"traces={traces}", *ROUND, "rounds=2", "resume=true",
                f"run_dir={run}")
        assert r.returncode == 0, r.stderr[-3000:]
        assert (run / "round-0.interrupted").is_dir()
        windows = [json.loads((run / "windows" / f"round-{i}.json").read_text())["trace_ids"] for i in (0, 1)]
        assert windows[0] == window0["trace_ids"]  # the killed round, redone on its own window
        decided = {n["id"]: n["decision"] for n in json.loads((run / "lineage.json").read_text())["nodes"]}
        if decided["round-0"] == "promoted":
            assert not set(windows[0]) & set(windows[1])  # no trace trained into the served lineage twice
        else:
            assert set(windows[0]) <= set(windows[1])  # a rejected round's verdicts come back to the next
        store = TraceStore(traces)
        assert set(windows[0]) | set(windows[1]) == set(store.ids(min_score=0.0))  # none lost
        store.close()
        for i in (0, 1):
            trained = json.loads((run / f"round-{i}" / "trained_on.json").read_text())["trace_ids"]
            assert trained and set(trained) <= set(windows[i])  # the window's train role only
        assert not any("@" in m.id for m in client.models.list().data)  # nothing left over on the server

        state = json.loads((run / "state.json").read_text())
        if state["served"] is None:  # neither round won its gate: the record of a promotion is what matters here
            lineage = json.loads((run / "lineage.json").read_text())
            state["served"] = "round-1"
            (run / "state.json").write_text(json.dumps(state))
            client.post("/load_lora_adapter", cast_to=object,
                        body={"lora_name": "evolved",
                              "lora_path": next(n for n in lineage["nodes"] if n["id"] == "round-1")["adapter"]})
        served = json.loads((run / "state.json").read_text())["served"]
        assert "evolved" in {m.id for m in client.models.list().data}

        # the server dies and comes back on its port without the adapter (as vLLM would)
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait()
        proc = subprocess.Popen([EXE, "evolve", f"model={server.url}/v1", f"traces={traces}", *ROUND, "rounds=3",
                                 "resume=true", f"run_dir={run}"], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        time.sleep(2)
        server = ServerProcess(f"traces={traces}", "verifier=numeric", port=server.port)
        _wait(lambda: "evolved" in {m.id for m in client.models.list().data}, timeout=120)
        proc.terminate()  # SIGTERM while it waits for traffic
        out = proc.communicate(timeout=60)[0]
        assert f"does not serve {served} as evolved: loading and verifying it again" in out
        answer = client.chat.completions.create(model="evolved", messages=[{"role": "user", "content": "1+1="}],
                                                temperature=0, max_tokens=8)
        assert answer.choices[0].message.content is not None
    finally:
        server.stop()


def test_evolve_stops_when_the_server_stays_away(tmp_path):
    traces = tmp_path / "traces.sqlite"
    TraceStore(traces).close()
    r = cli("evolve", f"model=http://127.0.0.1:{free_port()}/v1", f"traces={traces}", "server_wait_s=1",
            f"run_dir={tmp_path / 'evolve'}")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "did not answer for server_wait_s=1" in r.stderr
