"""Logged traffic as data (issue 32, part 3): what `selfevolve serve` logged — answers scored
by the verifier where a reference came, verdicts users posted later — is a task source for
`eval` and every recipe (`data=traces.sqlite`, carved by task id), and ReST-EM keeps the
logged answers that scored 1. Real server, real `openai` client, real SQLite."""

import json

import httpx
import openai
import pytest

from selfevolve.data import arith
from selfevolve.data.sources import load_tasks, logged_tasks
from selfevolve.data.store import TraceStore
from selfevolve.errors import UserError
from selfevolve.serving.process import ServerProcess
from tests.test_cli import cli


@pytest.fixture(scope="module")
def traffic(tmp_path_factory):
    """60 arith questions through the server, two answers each at T=1; a reference on the
    first 40, and for 10 of the rest a user's verdict posted after the fact; then 12
    refinement requests with a reference (two turns, the verifier's critique between)."""
    traces = tmp_path_factory.mktemp("traffic") / "traces.sqlite"
    server = ServerProcess(f"traces={traces}", "verifier=numeric")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0)
    try:
        for i, task in enumerate(arith.tasks("train", n=60)):
            extra = {"reference": task.reference} if i < 40 else {}
            r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": task.prompt}],
                                               temperature=1.0, n=2, seed=i, max_tokens=48, extra_body=extra)
            if i >= 50:
                right = task.reference in r.choices[0].message.content
                httpx.post(server.url + "/v1/feedback", json={"trace_id": r.model_extra["selfevolve"]["trace_ids"][0],
                                                              "score": float(right)}).raise_for_status()
        for i, task in enumerate(arith.tasks("train", n=72)[60:]):
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": task.prompt}],
                                           temperature=1.0, seed=i, max_tokens=32, extra_body={"refine": {
                                               "max_turns": 2, "critic": "verifier", "reference": task.reference}})
    finally:
        server.stop()
    return traces


def test_the_store_is_a_task_source_with_filters(traffic):
    tasks = logged_tasks(str(traffic))[:60]  # the plain requests; the refinements are the last 12
    assert len(tasks) == 60 and all(len(t.meta["logged"]) == 2 and t.meta["logged"][0].turns is None
                                    for t in tasks)
    assert sum(t.reference is not None for t in tasks) == 40
    refined = logged_tasks(str(traffic))[60:]
    assert len(refined) == 12 and any(t.meta["logged"][0].turns for t in refined)  # revised: every turn
    scored = logged_tasks(str(traffic), scored=True)
    assert len(scored) == 62 and all(a.score is not None for t in scored for a in t.meta["logged"])
    users = logged_tasks(str(traffic), source="user")
    assert len(users) == 10 and all(a.source == "user" for t in users for a in t.meta["logged"])
    roles = {r: {t.id for t in load_tasks(str(traffic), split=r, holdout=(0.2, 0.1), unscored_train=True)}
             for r in ("train", "validation", "test")}
    assert not roles["train"] & (roles["test"] | roles["validation"]) and not roles["test"] & roles["validation"]
    evaluated = {t.id for t in logged_tasks(str(traffic)) if t.reference is not None}
    assert roles["test"] | roles["validation"] <= evaluated  # held out: what a verifier can score
    assert len(roles["train"]) + len(roles["test"]) + len(roles["validation"]) > 52
    assert {t.id for t in load_tasks(str(traffic), split="train", holdout=(0.2, 0.1))} <= evaluated
    with pytest.raises(UserError, match="since_version"):
        logged_tasks(str(traffic), since_version="never-served")


def test_rest_em_trains_on_logged_answers_and_eval_reads_the_store(traffic, tmp_path):
    run = tmp_path / "run"
    r = cli("run", "recipe=rest_em", f"data={traffic}", "iterations=1", "num_samples=1", "epochs=1",
            "max_new_tokens=32", "eval_limit=16", "val_limit=8", f"run_dir={run}")
    assert r.returncode == 0, r.stderr[-2000:]
    store = TraceStore(run / "traces.sqlite")
    kept = store.query(meta={"phase": "e_step", "kept": True})
    from_logs = [t for t in kept if "trace" in t.turns[0].feedback.details]
    logged = TraceStore(traffic)
    assert from_logs and all(logged.get(t.turns[0].feedback.details["trace"]).turns[-1].score == 1.0
                             for t in from_logs)
    assert all("logged" not in t.task.meta for t in kept)
    recorded = json.loads((run / "trained_on.json").read_text())["trace_ids"]  # Run.trained_on: what it took
    assert sorted(recorded) == sorted({t.turns[0].feedback.details["trace"] for t in from_logs})
    assert json.loads((run / "summary.json").read_text())["after"]["n"] > 0
    r = cli("eval", f"data={traffic}", "limit=8", f"out={tmp_path / 'eval.json'}")
    assert r.returncode == 0, r.stderr[-2000:]
    r = cli("run", "recipe=rest_em", "data=arith", "scored=true", f"run_dir={tmp_path / 'bad'}")
    assert r.returncode == 2 and "trace store" in r.stderr


def test_star_spin_and_self_take_the_logged_answers(traffic, tmp_path):
    """STaR keeps logged correct answers and rationalises logged failures; SPIN's gold is a
    logged score-1 answer where there is one; SELF's meta-skill tuples include the logged
    refinement traces whose critique agrees with the first answer's score."""
    small = ["max_new_tokens=24", "eval_limit=8", "val_limit=8", "epochs=1"]
    r = cli("run", "recipe=star", f"data={traffic}", "iterations=1", *small, f"run_dir={tmp_path / 'star'}")
    assert r.returncode == 0, r.stderr[-2000:]
    star = TraceStore(tmp_path / "star" / "traces.sqlite")
    logged = star.query(meta={"phase": "logged"})
    assert logged and {t.meta["outcome"] for t in logged} == {"kept", "failed"}
    rationalised = {t.task.id for t in star.query(meta={"phase": "rationalize"})}
    failed = {t.task.id for t in logged if t.meta["outcome"] == "failed" and t.task.reference is not None}
    assert failed <= rationalised
    assert sorted(json.loads((tmp_path / "star" / "trained_on.json").read_text())["trace_ids"]) == sorted(
        t.turns[0].feedback.details["trace"] for t in logged)

    r = cli("run", "recipe=spin", f"data={traffic}", "iterations=1", *small, f"run_dir={tmp_path / 'spin'}")
    assert r.returncode == 0, r.stderr[-2000:]
    accepted = {t.id: [a.response for a in t.meta["logged"] if a.score == 1.0]
                for t in logged_tasks(str(traffic))}
    opponents = TraceStore(tmp_path / "spin" / "traces.sqlite").query(meta={"phase": "opponent"})
    from_logs = [t for t in opponents if accepted.get(t.task.id)]
    assert from_logs and all(t.meta["gold"] == accepted[t.task.id][-1] for t in from_logs)
    assert all(t.meta["gold"] == t.task.reference for t in opponents if not accepted.get(t.task.id))  # auto
    golds = {t.id: [a.trace_id for a in t.meta["logged"] if a.score == 1.0] for t in logged_tasks(str(traffic))}
    assert set(json.loads((tmp_path / "spin" / "trained_on.json").read_text())["trace_ids"]) >= {
        golds[t.task.id][-1] for t in from_logs}

    r = cli("run", "recipe=self_evolve", f"data={traffic}", "iterations=1", "meta_tasks=40", "evolve_tasks=8",
            "refine_samples=1", *small, f"run_dir={tmp_path / 'self'}")
    assert r.returncode == 0, r.stderr[-2000:]
    meta = TraceStore(tmp_path / "self" / "traces.sqlite").query(meta={"phase": "meta"})
    tuples = [t for t in meta if "logged" in t.meta]
    source = TraceStore(traffic)
    assert tuples and all(source.get(t.meta["logged"]).turns[0].critique.text == t.turns[0].critique.text
                          for t in tuples)
    assert all((t.turns[0].critique.verdict == "correct") == (t.turns[0].score == 1.0) for t in tuples)
    assert sorted(json.loads((tmp_path / "self" / "trained_on.json").read_text())["trace_ids"]) == sorted(
        t.meta["logged"] for t in tuples)


def test_score_resamples_the_logged_prompts_on_policy(traffic, tmp_path):
    """SCoRe takes the logged prompts with a reference and samples both attempts afresh from
    the adapter being trained: no logged answer enters its policy gradient."""
    r = cli("run", "recipe=score", f"data={traffic}", "stage1_steps=1", "stage2_steps=1", "batch_tasks=8",
            "max_new_tokens=24", "eval_limit=8", "val_limit=8", f"run_dir={tmp_path / 'score'}")
    assert r.returncode == 0, r.stderr[-2000:]
    rollouts = TraceStore(tmp_path / "score" / "traces.sqlite").query(meta={"stage": 2})
    assert rollouts and {t.policy_version for t in rollouts} == {"step-1"}  # sampled by the first update
    with_reference = {t.id for t in logged_tasks(str(traffic)) if t.reference is not None}
    assert {t.task.id for t in rollouts} <= with_reference and all(len(t.turns) == 2 for t in rollouts)
    assert all(t.turns[0].token_ids for t in rollouts)  # fresh samples, with the ids they were sampled as
