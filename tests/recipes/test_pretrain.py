"""The pretrain recipe end to end through the CLI, on a model small enough for seconds."""

import json

import pytest
import yaml

from selfevolve.data.store import TraceStore
from tests.recipes.resume import check_kill_and_resume
from tests.test_cli import cli

SMALL = ["recipe=pretrain", "steps=12", "num_hidden_layers=1", "hidden_size=64", "num_attention_heads=2",
         "intermediate_size=64", "batch_size=8", "warmup=2",
         "eval_limit=4", "val_limit=4", "max_new_tokens=8", "checkpoint_every=3", "log_every=2"]


def test_run_directory(tmp_path):
    d = tmp_path / "run"
    r = cli("run", *SMALL, f"run_dir={d}")
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load((d / "config.yaml").read_text())["steps"] == 12
    assert (d / "config.yaml").read_text().startswith("# selfevolve run recipe=pretrain")
    summary = json.loads((d / "summary.json").read_text())
    assert set(summary["before"]) == set(summary["after"]) >= {"acc_t1", "acc_t2", "delta", "n"}
    lines = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "step" in m] == [2, 4, 6, 8, 10, 12]
    assert [m["eval"] for m in lines if "eval" in m] == ["before", "after"]
    store = TraceStore(d / "traces.sqlite")
    assert store.count(meta={"eval": "before"}) == store.count(meta={"eval": "after"}) == 4
    assert (d / "model" / "model.safetensors").exists() and (d / "checkpoint" / "state.pt").exists()
    # a second run into the same directory refuses instead of overwriting
    again = cli("run", *SMALL, f"run_dir={d}")
    assert again.returncode == 2 and "already holds a run" in again.stderr
    changed = cli("run", *SMALL, "steps=13", f"run_dir={d}", "resume=true")
    assert changed.returncode == 2 and "different config: steps=13" in changed.stderr


@pytest.mark.slow  # test_run_directory resumes pretraining in the default run
def test_killed_and_resumed_run_ends_the_same(tmp_path):
    whole, cut = check_kill_and_resume(SMALL, tmp_path)

    def strip(p):
        return [{k: v for k, v in json.loads(x).items() if k != "time_train"} for x in p.read_text().splitlines()]

    assert strip(cut / "metrics.jsonl") == strip(whole / "metrics.jsonl")


def test_corpus_teaches_the_critique_format_but_not_the_verdict():
    """SELF needs a model that can write a critique in words it has seen; the verdicts are
    coin flips, so judging answers is left for SELF's meta-skill learning to teach."""
    import random

    from selfevolve.data import arith
    from selfevolve.feedback.prompts import VERIFIER_RIGHT
    from selfevolve.recipes.pretrain import PretrainConfig, corpus_example

    rng = random.Random(0)
    assert not any(
        ex[0]["content"].startswith("Check this") for ex in (corpus_example(rng, PretrainConfig()) for _ in range(2000))
    )
    cfg = PretrainConfig(p_critique=0.1)  # the bundled tiny has none; SELF needs them (docs/recipes.md)
    critiques = [ex for ex in (corpus_example(rng,
                                              cfg) for _ in range(4000)) if ex[0]["content"].startswith("Check this")]
    assert 150 < len(critiques) < 250  # p_critique / 2 of the corpus
    said_right = {True: 0, False: 0}  # draft right? -> times the critique said "no errors"
    drafts = {True: 0, False: 0}
    for user, critique in critiques:
        q, a = user["content"].split("Question: What is ")[1].split("?\nAnswer: ")
        right = a.endswith(f" {arith.evaluate([int(x) for x in q.split()[::2]], q.split()[1::2])}.")
        drafts[right] += 1
        said_right[right] += critique["content"] == VERIFIER_RIGHT
    for right in (True, False):
        assert 0.35 < said_right[right] / drafts[right] < 0.65


def test_a_second_look_corpus_answers_direct_first_and_re_derives_as_a_second_turn():
    """p_direct=1 with p_recheck: first answers are direct; a step-by-step derivation comes as a
    second answer, after wrong drafts (p_fix, fixing them) and after right ones (p_recheck).
    p_steps_prompt adds questions asked step by step, answered with the derivation."""
    import random
    import re

    from selfevolve.data import arith
    from selfevolve.recipes.pretrain import PretrainConfig, corpus_example

    def value_of(question: str) -> int:
        expression = question.removeprefix("What is ").removeprefix("Work it out step by step: ")[:-1].split()
        return arith.evaluate([int(x) for x in expression[::2]], expression[1::2])

    rng, cfg = random.Random(0), PretrainConfig(p_direct=1.0, p_two_turn=0.5, p_fix=0.8, p_recheck=0.2)
    corpus = [corpus_example(rng, cfg) for _ in range(4000)]
    direct = re.compile(r"The answer is -?\d+\.")
    assert all(direct.fullmatch(ex[1]["content"]) for ex in corpus)  # every first answer
    rederived = {True: [], False: []}  # draft right? -> second answers
    for q, draft, _, answer in (ex for ex in corpus if len(ex) == 4):
        value = value_of(q["content"])
        rederived[draft["content"] == f"The answer is {value}."].append(not direct.fullmatch(answer["content"]))
        if not direct.fullmatch(answer["content"]):
            assert answer["content"].endswith(f"The answer is {value}.")  # a derivation is always right
    assert 0.15 < sum(rederived[True]) / len(rederived[True]) < 0.25  # p_recheck
    assert 0.75 < sum(rederived[False]) / len(rederived[False]) < 0.85  # p_fix
    rng, cfg = random.Random(0), cfg.model_copy(update={"p_steps_prompt": 0.3})
    corpus = [corpus_example(rng, cfg) for _ in range(2000)]
    asked = [ex for ex in corpus if ex[0]["content"].startswith("Work it out step by step: ")]
    assert 0.25 < len(asked) / 2000 < 0.35
    for q, answer in asked:
        nums_ops = q["content"].removeprefix("Work it out step by step: ")[:-1].split()
        assert answer["content"] == arith.step_solution([int(x) for x in nums_ops[::2]], nums_ops[1::2])
    assert all(direct.fullmatch(ex[1]["content"]) for ex in corpus if ex not in asked)  # the rest stay direct


def test_the_bundled_tiny_look_answers_direct_and_derives_when_asked_step_by_step():
    """`model=tiny-look` is the second-look corpus's model: greedy, a question gets a direct
    answer and the same question asked step by step gets a derivation, mostly right."""
    import re

    import torch

    from selfevolve.data import arith
    from selfevolve.policies import HFPolicy
    from selfevolve.recipes.pretrain import STEPS_QUESTION
    from selfevolve.types import SamplingParams

    torch.set_num_threads(2)
    policy = HFPolicy("tiny-look", device="cpu")
    problems = arith.sample_problems(0, "validation", 32, difficulty=2)
    greedy = SamplingParams(temperature=0, max_new_tokens=64)
    expressions = [arith.render(n, o) for n, o in problems]
    first = [out[0].response for out in policy.generate(
        [[{"role": "user", "content": arith.question(e)}] for e in expressions], greedy)]
    steps = [out[0].response for out in policy.generate(
        [[{"role": "user", "content": STEPS_QUESTION.format(expression=e)}] for e in expressions], greedy)]
    # measured 2026-12-06: 32 direct, 32 derivations of two steps, 31 of them right
    assert sum(bool(re.fullmatch(r"The answer is -?\d+\.", f)) for f in first) >= 30, first
    assert sum(s.count(" = ") == 2 for s in steps) >= 30, steps  # one sentence per operation
    right = sum(s.endswith(arith.final_line(arith.evaluate(n, o))) for s, (n, o) in zip(steps, problems))
    assert right >= 24, steps
