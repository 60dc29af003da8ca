"""`selfevolve evolve` against a live `selfevolve serve` (issue 32, part 4): real server
process, real `openai` client for the traffic, real SQLite, the evolve rounds as a real
process. A round trains on the logged traffic, the gate compares candidate and served
version on held-out traffic, and only a promoted version is served under `serve_as`; a
deliberately bad round (a learning rate far too high) is rejected and what traffic gets does
not change; the lineage records both."""

import json

import openai

from selfevolve.data import arith
from selfevolve.serving.process import ServerProcess
from tests.test_cli import cli

ROUND = ["recipe=rest_em", "iterations=1", "num_samples=2", "epochs=1", "max_new_tokens=32", "eval_limit=16",
         "val_limit=32", "every=40"]


def _models(client) -> set[str]:
    return {m.id for m in client.models.list().data}


def test_gated_rounds_on_live_traffic(tmp_path):
    traces = tmp_path / "traces.sqlite"
    server = ServerProcess(f"traces={traces}", "verifier=numeric")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0)
    try:
        for i, task in enumerate(arith.tasks("train", n=120)):
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": task.prompt}],
                                           temperature=1.0, seed=i, max_tokens=48,
                                           extra_body={"reference": task.reference})
        run = tmp_path / "evolve"
        r = cli("evolve", f"model={server.url}/v1", f"traces={traces}", *ROUND, "rounds=1", f"run_dir={run}")
        assert r.returncode == 0, r.stderr[-3000:]
        state = json.loads((run / "state.json").read_text())
        lineage = json.loads((run / "lineage.json").read_text())
        first = next(n for n in lineage["nodes"] if n["id"] == "round-0")
        assert first["decision"] in ("promoted", "rejected") and "round 0:" in r.stdout
        assert json.loads((run / "round-0" / "trained_on.json").read_text())["upto_seq"] == 120
        assert ("evolved" in _models(client)) == (first["decision"] == "promoted") == (state["served"] == "round-0")
        probe = [{"role": "user", "content": t.prompt} for t in arith.tasks("test", n=6)]
        served = "evolved" if state["served"] else "tiny"
        before = [client.chat.completions.create(model=served, messages=[m], temperature=0, max_tokens=32)
                  .choices[0].message.content for m in probe]

        for i, task in enumerate(arith.tasks("train", n=160)[120:]):  # more traffic, then a bad round
            client.chat.completions.create(model=served, messages=[{"role": "user", "content": task.prompt}],
                                           temperature=1.0, seed=i, max_tokens=48,
                                           extra_body={"reference": task.reference})
        r = cli("evolve", f"model={server.url}/v1", f"traces={traces}", *ROUND, "rounds=2", "lr=3.0", "resume=true",
                f"run_dir={run}")
        assert r.returncode == 0, r.stderr[-3000:]
        lineage = json.loads((run / "lineage.json").read_text())
        bad = next(n for n in lineage["nodes"] if n["id"] == "round-1")
        # the gate rejects it, or training already diverged (non-finite): never served either way
        assert bad["decision"] == "failed" or (bad["decision"] == "rejected" and bad["p_value"] > 0.05)
        parent = state["served"] or "base"
        assert {"source": parent, "target": "round-1"} in [{k: e[k] for k in ("source", "target")}
                                                           for e in lineage["edges"]]
        after = [client.chat.completions.create(model=served, messages=[m], temperature=0, max_tokens=32)
                 .choices[0].message.content for m in probe]
        assert after == before  # the rejected version never served traffic
        assert (run / "lineage.graphml").is_file() and not any("@" in m for m in _models(client))
        r = cli("report", str(run))  # the lineage drawn, and the served accuracy over rounds
        assert r.returncode == 0 and {"lineage.png", "served.png", "report.html"} <= {
            p.name for p in (run / "report").iterdir()}
        trained = json.loads((run / "round-0" / "trained_on.json").read_text())["trace_ids"]
        r = cli("traces", str(traces), f"trained_by={run / 'round-0'}", f"export={tmp_path / 'made.jsonl'}")
        assert r.returncode == 0, r.stderr
        assert sorted(json.loads(line)["id"] for line in open(tmp_path / "made.jsonl")) == sorted(trained)
    finally:
        server.stop()


def test_evolve_refuses_bad_input(tmp_path):
    r = cli("evolve", "model=http://127.0.0.1:9/v1", f"traces={tmp_path / 'none.sqlite'}")
    assert r.returncode == 2 and "no such trace store" in r.stderr
    r = cli("evolve", "model=http://127.0.0.1:9/v1", "lr=abc")
    assert r.returncode == 2 and "lr" in r.stderr
    r = cli("evolve", "traces=x.sqlite")
    assert r.returncode == 2 and "model=URL" in r.stderr
