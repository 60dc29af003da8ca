"""STaR: keep / rationalise / reject on hand-made samples and on the tiny model, and the
recipe end to end through the CLI (short run, a user's JSONL with renamed fields, resume)."""

import json

from selfevolve.data import arith
from selfevolve.data.store import TraceStore
from selfevolve.recipes.star import StarConfig, collect, hinted, reproduces_hint, training_example
from selfevolve.types import Feedback, Task, Trace, Turn
from tests.recipes.pins import assert_pinned
from tests.recipes.resume import check_kill_and_resume
from tests.recipes.selection import check_selected_on_validation
from tests.test_cli import cli

SMALL = ["recipe=star", "iterations=2", "patience=2", "train_tasks=24", "eval_limit=12", "val_limit=12", "epochs=1",
         "max_new_tokens=32", "sft_batch_size=8"]
TASK = Task(id="t", prompt="What is 7 + 8 - 3 + 4?", reference="16")


def test_a_rationalised_example_is_trained_without_the_hint():
    hint = hinted(TASK)
    assert hint != TASK.prompt and "16" in hint and "16" not in TASK.prompt
    trace = Trace(task=TASK, turns=[Turn(response="7 + 8 = 15. 15 - 3 = 12. 12 + 4 = 16. The answer is 16.",
                                         feedback=Feedback(score=1.0))],
                  meta={"phase": "rationalize", "outcome": "rationalised", "hint_prompt": hint})
    conv = training_example(trace)
    assert conv[0] == {"role": "user", "content": TASK.prompt}
    assert "Hint" not in json.dumps(conv)


def test_a_rationale_that_reads_the_hint_is_not_a_rationale():
    # It reaches 16 only by quoting the hint: trained on the prompt alone it would teach
    # the model to state answers it cannot derive.
    assert reproduces_hint("The hint says the answer is 16. The answer is 16.", TASK)
    assert reproduces_hint("As HINTED, 16.", TASK)
    assert not reproduces_hint("7 + 8 = 15. 15 - 3 = 12. 12 + 4 = 16. The answer is 16.", TASK)


def test_a_rationale_that_copies_the_hints_words_or_a_code_reference_is_rejected():
    capital = Task(id="c", prompt="Which city is the capital of Australia?",
                   reference="Canberra, chosen as a compromise between Sydney and Melbourne")
    assert reproduces_hint("Canberra, chosen as a compromise between Sydney and Melbourne.", capital)
    assert not reproduces_hint("Sydney is the largest city, but the capital is Canberra.", capital)
    solution = ("    seen = set()\n    for x in numbers:\n        if x in seen:\n            return True\n"
                "        seen.add(x)\n    return False\n")
    code = Task(id="dup", prompt="def has_duplicate(numbers):\n", reference=solution, entry_point="has_duplicate")
    assert reproduces_hint(f"```python\ndef has_duplicate(numbers):\n{solution}```", code)
    own = "```python\ndef has_duplicate(numbers):\n    return len(set(numbers)) != len(numbers)\n```"
    assert not reproduces_hint(own, code)


def test_collect_records_every_outcome_and_trains_only_on_correct_answers(tiny, tmp_path):
    from selfevolve.config import build
    from selfevolve.run import Run
    from selfevolve.verifiers import NumericVerifier

    cfg = build(StarConfig, {"recipe": "star", "run_dir": str(tmp_path / "r"), "max_new_tokens": 32})
    run = Run(cfg)
    tasks = arith.tasks("train", n=40)
    counts = collect(tiny, tasks, NumericVerifier(), cfg, 0, run)
    assert counts["kept"] + counts["failed"] == 40
    assert counts["rationalised"] + counts["rejected"] == counts["failed"]
    first = run.store.query(meta={"phase": "generate"})
    assert len(first) == 40
    for t in run.store.query(meta={"phase": "rationalize"}):
        assert t.meta["hint_prompt"] == hinted(t.task) and t.task.prompt in t.meta["hint_prompt"]
        assert (t.meta["outcome"] == "rationalised") == (t.turns[0].score == 1.0 and not t.meta["reproduces_hint"])
    chosen = run.store.query(meta={"outcome": "kept"}) + run.store.query(meta={"outcome": "rationalised"})
    assert all(t.turns[0].score == 1.0 for t in chosen)
    assert all("Hint" not in training_example(t)[0]["content"] for t in chosen)

    ablation = build(StarConfig, {"recipe": "star", "run_dir": str(tmp_path / "a"), "rationalize": False,
                                  "max_new_tokens": 32})
    run2 = Run(ablation)
    counts = collect(tiny, tasks, NumericVerifier(), ablation, 0, run2)
    assert counts["rationalised"] == counts["rejected"] == 0 and run2.store.count(meta={"phase": "rationalize"}) == 0


def test_run_through_the_cli(tmp_path):
    d = tmp_path / "run"
    r = cli("run", *SMALL, f"run_dir={d}")
    assert r.returncode == 0, r.stderr
    summary = json.loads((d / "summary.json").read_text())
    assert [h["iteration"] for h in summary["iterations"]] == [0, 1]
    check_selected_on_validation(d)
    assert (d / summary["best_adapter"] / "adapter_config.json").exists()
    assert_pinned(d, sft_loss=0.095936, kept=18, rationalised=2)
    its = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if '"kept"' in x]
    assert all(m["kept"] + m["failed"] == 24 and m["rationalised"] + m["rejected"] == m["failed"] for m in its)
    store = TraceStore(d / "traces.sqlite")
    # the second iteration sampled from the first update, synced into the policy
    assert {t.policy_version for t in store.query(round=1, meta={"phase": "generate"})} == {"iter-0"}


def test_killed_and_resumed_run_ends_the_same(tmp_path):
    check_kill_and_resume(SMALL, tmp_path)


def test_on_a_user_file_with_renamed_fields(tmp_path):
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({"q": t.prompt, "a": t.reference}) + "\n" for t in arith.tasks("train", n=50)))
    d = tmp_path / "run"
    r = cli("run", "recipe=star", f"data={data}", "prompt_field=q", "answer_field=a", "iterations=1", "epochs=1",
            "max_new_tokens=32", f"run_dir={d}")
    assert r.returncode == 0, r.stderr
    store = TraceStore(d / "traces.sqlite")
    trained = {t.task.id for t in store.query(meta={"phase": "generate"})}
    held_out = {t.task.id for t in store.query(meta={"eval": "before"})}
    validation = {t.task.id for t in store.query(meta={"eval": "iteration-0"})}
    assert trained and held_out and validation and len(trained | held_out | validation) == 50
    assert not trained & held_out and not trained & validation and not validation & held_out
