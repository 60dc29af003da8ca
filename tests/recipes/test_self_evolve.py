"""SELF: the filter on hand-made tuples, the meta-skill examples, and the recipe end to end."""

import json

from selfevolve.data.store import TraceStore
from selfevolve.feedback.prompts import CRITIQUE
from selfevolve.recipes.self_evolve import feedback_token_ids, keep, meta_examples
from selfevolve.types import Feedback, Task, Trace, Turn
from tests.recipes.pins import assert_pinned
from tests.recipes.resume import check_kill_and_resume
from tests.test_cli import cli

SMALL = ["recipe=self_evolve", "iterations=1", "meta_tasks=16", "evolve_tasks=16", "eval_limit=8", "val_limit=8",
         "epochs=1", "max_new_tokens=24", "critique_tokens=16", "sft_batch_size=8"]
TASK = Task(id="t", prompt="What is 7 + 8 - 3 + 4?", reference="16")


def _critique(verdict):
    return Feedback(text="The answer has no errors." if verdict == "correct" else "Step 2 is wrong.", source="self",
                    verdict=verdict)


def test_filter_by_verifier_and_by_own_verdict():
    refined_right = Trace(task=TASK, turns=[Turn(response="The answer is 15.", critique=_critique("wrong")),
                                            Turn(response="The answer is 16.", feedback=Feedback(score=1.0),
                                                 critique=_critique("wrong"))])
    refined_wrong = Trace(task=TASK, turns=[Turn(response="The answer is 16.", critique=_critique("wrong")),
                                            Turn(response="The answer is 17.", feedback=Feedback(score=0.0),
                                                 critique=_critique("correct"))])
    accepted = Trace(task=TASK, turns=[Turn(response="The answer is 16.", feedback=Feedback(score=1.0),
                                            critique=_critique("correct"))])
    assert [keep(t, "verifier") for t in (refined_right, refined_wrong, accepted)] == [True, False, True]
    # the model's own verdict on the answer it ended with: it can be fooled, which is why
    # the verifier is used when there is one (and the choice is recorded)
    assert [keep(t, "self") for t in (refined_right, refined_wrong, accepted)] == [False, True, True]


def test_meta_skill_examples_teach_feedback_and_refinement():
    wrong = Turn(response="The answer is 15.", feedback=Feedback(score=0.0),
                 critique=Feedback(text="Your answer is wrong: wrong answer 15."))
    t = Trace(task=TASK, turns=[wrong, Turn(response="7 + 8 = 15. 15 - 3 = 12. 12 + 4 = 16. The answer is 16.",
                                            feedback=Feedback(score=1.0))])
    feedback, refinement, answer = meta_examples(t)
    assert feedback[0]["content"] == CRITIQUE.format(question=TASK.prompt, answer="The answer is 15.", notes="")
    assert feedback[1]["content"] == "Your answer is wrong: wrong answer 15."
    assert refinement[-1]["content"].endswith("The answer is 16.") and "wrong answer 15" in refinement[2]["content"]
    assert "16" not in json.dumps(feedback)  # the feedback never gives the reference away
    assert answer == [{"role": "user", "content": TASK.prompt}, {"role": "assistant", "content": t.turns[1].response}]
    right = Turn(response="The answer is 16.", feedback=Feedback(score=1.0),
                 critique=Feedback(text="The answer has no errors."))
    assert [m[-1]["content"] for m in meta_examples(Trace(task=TASK, turns=[right]))] == [
        "The answer has no errors.",
        "The answer is 16.",
    ]  # feedback, and the (right) answer itself
    # no accepted refinement: the verdict still teaches feedback; no wrong answer is trained on
    assert meta_examples(Trace(task=TASK, turns=[wrong])) == [feedback]


def test_feedback_tokens_are_the_words_only_feedback_uses():
    from transformers import AutoTokenizer

    from selfevolve.models import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("tiny"))
    wrong = Turn(response="The answer is 15.", critique=Feedback(text="Your answer is wrong: wrong answer 15."))
    ids = feedback_token_ids(tok, [Trace(task=TASK, turns=[wrong])])

    def tokens(text):
        return set(tok(text, add_special_tokens=False)["input_ids"])

    answering = tokens(TASK.prompt + " The answer is 15.")
    assert ids and not set(ids) & answering  # digits, "The", " answer", " is" stay as they are
    for words in ("Check this answer", "has no errors", "Your answer is wrong: wrong"):  # prompt and feedback
        assert tokens(words) - answering <= set(ids)


def test_run_through_the_cli(tmp_path):
    d = tmp_path / "run"
    r = cli("run", *SMALL, f"run_dir={d}")
    assert r.returncode == 0, r.stderr
    store = TraceStore(d / "traces.sqlite")
    meta = store.query(meta={"phase": "meta"})
    assert len(meta) == 16 and all(t.turns[0].critique.source == "verifier" for t in meta)
    assert all(t.turns[-1].score == 1.0 for t in meta if len(t.turns) == 2)  # only accepted refinements are kept
    assert all(t.turns[0].critique.verdict == "wrong" for t in meta if len(t.turns) == 2)
    evolved = store.query(meta={"phase": "evolve"})
    assert len(evolved) == 16 and all(t.meta["filter"] == "verifier" for t in evolved)
    assert {t.policy_version for t in evolved} == {"phase-0"}  # the meta-skill model evolves
    assert all(t.meta["kept"] == (t.turns[-1].score == 1.0) for t in evolved)
    # evaluation used the model as its own critic
    ev = store.query(meta={"eval": "phase-1"})
    assert ev and all(t.turns[0].critique is None or t.turns[0].critique.source == "self" for t in ev)
    summary = json.loads((d / "summary.json").read_text())
    assert_pinned(d, sft_loss=12.68539, examples=26)
    assert [p["phase"] for p in summary["phases"]] == [0, 1]
    # the feedback words' embedding rows are trained and carried by every adapter
    n = summary["phases"][0]["feedback_tokens"]
    for phase in (0, 1):
        cfg = json.loads((d / "adapters" / f"phase-{phase}" / "adapter_config.json").read_text())
        assert n > 0 and len(cfg["trainable_token_indices"]) == n


def test_killed_and_resumed_run_ends_the_same(tmp_path):
    check_kill_and_resume(SMALL, tmp_path)
