"""Pinned numbers (issue 34): the first logged training step of each recipe's small seeded run,
so that a change to the maths — a loss, a credit, a normalisation, a default — is a visible
decision (update the pin and say why in the commit), not a silent drift every other test
passes. Measured with the torch CI installs (`.ci/run` pins it); another torch is skipped."""

import json

import pytest
import torch

TORCH = "2.13.0"


def assert_pinned(run_dir, step: int | None = None, **expected: float) -> None:
    """The first training line holding every `expected` key (that of `step`, if given)."""
    if not torch.__version__.startswith(TORCH):
        pytest.skip(f"numbers pinned with torch {TORCH}, this is {torch.__version__}")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if set(expected) <= set(r) and "eval" not in r and step in (None, r.get("step")))
    got = {k: first[k] for k in expected}
    assert got == pytest.approx(expected, rel=1e-3, abs=1e-5), f"pinned numbers moved: {got}"
