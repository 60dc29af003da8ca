"""`data=reasoning_gym:NAME?key=value`: a reasoning-gym family as a task source (seeded, its
config from the spec), carved into disjoint roles, scored by selfevolve's verifiers or by
reasoning-gym's own scorer (`verifier=reasoning_gym`), through the CLI as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("reasoning_gym")

SPEC = "reasoning_gym:chain_sum?min_terms=2&max_terms=3&max_digits=1&size=300&seed=4"


def test_rows_roles_and_seed():
    from selfevolve.data.sources import load_tasks

    every = load_tasks(SPEC)
    assert len({t.id for t in every}) == len(every) > 200  # one task per distinct question
    assert all(t.reference.lstrip("-").isdigit() and "arithmetic problem" in t.prompt for t in every)
    roles = {r: {t.id for t in load_tasks(SPEC, split=r, holdout=(0.2, 0.1))} for r in ("train", "validation", "test")}
    assert not (roles["train"] & roles["test"]) and not (roles["train"] & roles["validation"])
    assert set().union(*roles.values()) == {t.id for t in every}
    again = load_tasks(SPEC)
    other = load_tasks(SPEC.replace("seed=4", "seed=5"))
    assert [t.prompt for t in again] == [t.prompt for t in every] != [t.prompt for t in other]


def test_reasoning_gyms_own_scorer():
    from selfevolve.data.sources import load_tasks
    from selfevolve.verifiers import get_verifier

    t = load_tasks(SPEC, limit=1)[0]
    scorer = get_verifier("reasoning_gym")
    assert scorer.verify(t, f"The answer is {t.reference}.").score == 1.0
    assert scorer.verify(t, f"The answer is {int(t.reference) + 1}.").score < 1.0
    assert get_verifier("numeric").verify(t, f"The answer is {t.reference}.").score == 1.0
    revised = f"The answer is {int(t.reference) + 1}. Checking again, the answer is {t.reference}."
    assert scorer.verify(t, revised).score == 1.0  # the last stated answer


@pytest.mark.parametrize("spec,words", [
    ("reasoning_gym:no_such_family", "reasoning-gym refused it"),
    ("reasoning_gym:chain_sum?min_terms", "expected key=value"),
    ("reasoning_gym:chain_sum?bogus_key=3", "reasoning-gym refused it"),
])
def test_a_bad_spec_is_one_line_and_exit_2(spec, words):
    r = subprocess.run([sys.executable, "-m", "selfevolve.cli", "check", f"data={spec}", "verifier=numeric"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_eval_through_the_cli(tmp_path):
    """`selfevolve eval` on the family, both scorers: on this family they agree."""
    out = {}
    for verifier in ("numeric", "reasoning_gym"):
        subprocess.run([sys.executable, "-m", "selfevolve.cli", "eval", f"data={SPEC}", f"verifier={verifier}",
                        "limit=30", f"out={tmp_path / verifier}.json"], check=True, capture_output=True)
        out[verifier] = json.loads((tmp_path / f"{verifier}.json").read_text())["acc_t1"]
    assert out["numeric"] == out["reasoning_gym"]
