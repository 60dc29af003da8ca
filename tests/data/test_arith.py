import random

import pytest

from selfevolve.data import arith
from selfevolve.errors import UserError


def test_deterministic_and_disjoint():
    a = arith.tasks("test", n=500, seed=0)
    assert [t.prompt for t in a] == [t.prompt for t in arith.tasks("test", n=500, seed=0)]
    train = {t.prompt for t in arith.tasks("train", n=2000, seed=0)}
    assert not train & {t.prompt for t in a}
    assert len({t.prompt for t in a}) == 500


def test_seed_changes_tasks_and_difficulty_changes_length():
    assert arith.tasks("test", 5, seed=0)[0].prompt != arith.tasks("test", 5, seed=1)[0].prompt
    for d in (1, 2, 4):
        t = arith.tasks("test", 3, difficulty=d)[0]
        assert t.meta["expression"].count(" ") == 2 * d
    assert arith.tasks("test", 1)[0].meta["difficulty"] == 3  # the default


def test_references_are_right():
    for t in arith.tasks("test", 50):
        assert int(t.reference) == eval(t.meta["expression"])


def test_solution_styles_and_slips():
    nums, ops = [7, 8, 3], ["+", "-"]
    assert arith.step_solution(nums, ops) == "7 + 8 = 15. 15 - 3 = 12. The answer is 12."
    assert arith.direct_solution(nums, ops) == "The answer is 12."
    slipped = arith.step_solution(nums, ops, slip_at=0, rng=random.Random(0))
    assert not slipped.endswith("The answer is 12.")


def test_too_many_tasks_is_an_error_not_a_hang():
    with pytest.raises(UserError, match="about 14 distinct test tasks, not 100"):
        arith.tasks("test", n=100, difficulty=1)
    with pytest.raises(UserError, match="about 14 distinct validation tasks, not 100"):
        arith.tasks("validation", n=100, difficulty=1)


def test_unknown_split():
    with pytest.raises(UserError, match="splits"):
        arith.tasks("dev", 3)
