"""`equations`: the task family where checking is easier than solving (issue 16)."""

import hashlib
import json
import random
import re

import pytest

from selfevolve.data import arith, equations
from selfevolve.data.sources import load_tasks
from selfevolve.errors import UserError
from verifiers.numeric import NumericVerifier


def lhs_value(equation: str, x: int) -> int:
    return eval(equation.split(" = ")[0].replace("x", str(x)))


def test_references_solve_the_equation_and_splits_follow_arith():
    test = equations.tasks("test", n=300, seed=0)
    assert [t.prompt for t in test] == [t.prompt for t in equations.tasks("test", n=300, seed=0)]
    assert len({t.prompt for t in test}) == 300
    train = {t.prompt for t in equations.tasks("train", n=2000, seed=0)}
    assert not train & {t.prompt for t in test}
    for t in test:
        eq = t.meta["equation"]
        assert t.prompt == f"Find x: {eq}." and eq.count("x") == 1
        assert lhs_value(eq, int(t.reference)) == int(eq.split(" = ")[1])
        # the expression it hides an operand of is an arith test expression
        assert arith.split_of(eq.split(" = ")[0].replace("x", t.reference)) == "test"


def test_the_left_side_grows_with_x():
    """x never follows a '-', so one difference corrects any guess (what makes checking easy)."""
    for t in equations.tasks("validation", n=200, seed=1, difficulty=4):
        eq = t.meta["equation"]
        assert not re.search(r"- x", eq)
        assert lhs_value(eq, 9) - lhs_value(eq, 1) == 8


def test_running_values_are_digits_and_wrong_drafts_carry_no_prior_on_the_gap():
    """The two properties the module docstring and `wrong_guess` give the measured reasons for."""
    for t in equations.tasks("train", n=300, seed=2, difficulty=3):
        toks = t.meta["equation"].split(" = ")[0].replace("x", t.reference).split(" ")
        assert all(0 <= eval(" ".join(toks[:k + 1])) <= 9 for k in range(0, len(toks), 2)), t.meta["equation"]
    rng = random.Random(0)
    for answer in range(1, 10):
        guesses = [equations.wrong_guess(answer, rng) for _ in range(4000)]
        assert answer not in guesses and all(1 <= g <= 9 for g in guesses)
        distances = [abs(g - answer) for g in guesses]
        possible = {d for d in range(1, 9) if answer - d >= 1 or answer + d <= 9}
        assert set(distances) == possible
        for d in possible:  # uniform over the possible distances
            assert abs(distances.count(d) / len(guesses) - 1 / len(possible)) < 0.03


def test_a_check_corrects_every_guess_with_right_arithmetic():
    for t in equations.tasks("test", n=100, seed=0):
        nums, ops, hidden = equations.parts(t)
        for guess in range(1, 10):
            text = equations.check_solution(nums, ops, hidden, guess)
            eq = t.meta["equation"]
            assert text.startswith(f"Check x = {guess} in {eq}: ") and text.endswith(f"The answer is {t.reference}.")
            work = text.split(": ", 1)[1].removesuffix(f" The answer is {t.reference}.")
            for clause in re.split(r"\. |, |\.$", work):
                if clause and not clause.startswith("not "):  # every "=" in a chain holds
                    assert len({eval(side) for side in clause.removeprefix("so x = ").split(" = ")}) == 1, text
            assert "- -" not in text and "+ -" not in text  # only the forward forms arith teaches
            wrong = guess != int(t.reference)
            assert ("so x =" in text) == wrong == (f", not {eq.split(' = ')[1]}. " in text)
            if wrong:  # the gap is positive
                assert int(re.search(r"= (\d+), so x", text)[1]) > 0


def test_built_in_and_scored_by_the_numeric_verifier():
    t = load_tasks("equations", split="test", limit=3, seed=0, difficulty=2)[0]
    assert t.meta["difficulty"] == 2
    v, x = NumericVerifier(), int(t.reference)
    nums, ops, hidden = equations.parts(t)
    wrong = equations.wrong_guess(x, random.Random(0))
    assert v.verify(t, f"The answer is {x}.").score == 1.0
    assert v.verify(t, f"The answer is {wrong}.").score == 0.0
    assert v.verify(t, equations.check_solution(nums, ops, hidden, wrong)).score == 1.0


def test_too_many_tasks_is_an_error():
    with pytest.raises(UserError, match="data=equations difficulty=1 has about 8 distinct test tasks, not 100"):
        equations.tasks("test", n=100, difficulty=1)
    with pytest.raises(UserError, match="splits"):
        equations.tasks("dev", 3)


def test_pretraining_corpus_checks_drafts_and_leaves_the_bundled_corpus_alone():
    from selfevolve.recipes.pretrain import PretrainConfig, corpus_example

    def digest(cfg):
        rng = random.Random(0)
        return hashlib.sha256(json.dumps([corpus_example(rng, cfg) for _ in range(3000)]).encode()).hexdigest()

    # the corpus the bundled tiny was trained on (computed before p_equation, p_recheck and p_steps_prompt existed)
    assert digest(PretrainConfig()) == "503588ea6b4d2194ffade0d5443633e47c2da35efdb6cd9d429e6c4194906513"
    rng, cfg = random.Random(0), PretrainConfig(p_equation=0.5)
    corpus = [corpus_example(rng, cfg) for _ in range(4000)]
    eqs = [ex for ex in corpus if ex[0]["content"].startswith("Find x: ")]
    assert 1800 < len(eqs) < 2200
    # solving is only ever shown as a direct answer; checking only in second turns
    assert all(re.fullmatch(r"The answer is \d\.", ex[1]["content"]) for ex in eqs)
    checks = [ex for ex in eqs if len(ex) == 4 and ex[3]["content"].startswith("Check")]
    assert 0.08 < len(checks) / len(eqs) < 0.12  # p_two_turn * p_fix
    for ex in checks:
        x = int(re.search(r"The answer is (\d)\.$", ex[3]["content"])[1])
        eq = ex[0]["content"].removeprefix("Find x: ").removesuffix(".")
        assert lhs_value(eq, x) == int(eq.split(" = ")[1])  # a check always ends right
