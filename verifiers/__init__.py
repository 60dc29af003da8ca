"""Verifiers: trusted, deterministic scoring (installed as `selfevolve.verifiers`).

Every verifier has `verify(task, response) -> Feedback` (score in [0, 1], a short `text`
saying why, `details`) and `verify_batch(tasks, responses)`. `get_verifier(name)` takes a
short name from VERIFIERS or a dotted import path (`package.module:Name` or
`package.module.Name`) to a Verifier class, a Verifier instance, or a TRL-style reward
function `f(prompts, completions, **kwargs) -> list[float]`.
"""

from __future__ import annotations

import importlib
import inspect

from selfevolve.errors import UserError
from selfevolve.types import as_verifier
from selfevolve.verifiers.code import CodeVerifier
from selfevolve.verifiers.math import MathVerifier
from selfevolve.verifiers.numeric import NumericVerifier
from selfevolve.verifiers.pool import VerifierPool
from selfevolve.verifiers.reasoning_gym import ReasoningGymVerifier
from selfevolve.verifiers.rewards import RewardFunctionVerifier, reward_function
from selfevolve.verifiers.text import ChoiceVerifier, ExactVerifier, RegexVerifier

VERIFIERS = {"numeric": NumericVerifier, "math": MathVerifier, "code": CodeVerifier, "exact": ExactVerifier,
             "regex": RegexVerifier, "choice": ChoiceVerifier, "reasoning_gym": ReasoningGymVerifier}


def get_verifier(name: str, workers: int = 1):
    """The verifier `name` names; with workers > 1, wrapped in a VerifierPool."""
    verifier = _resolve(name)
    return VerifierPool(verifier, workers=workers) if workers > 1 else verifier


def _resolve(name: str):
    if name in VERIFIERS:
        return VERIFIERS[name]()
    if "." not in name and ":" not in name:
        raise UserError(f"unknown verifier={name!r}; choose one of {sorted(VERIFIERS)} or give a dotted import path")
    mod, _, attr = name.replace(":", ".").rpartition(".")
    try:
        obj = getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
        raise UserError(f"verifier={name}: cannot import ({e})") from None
    if inspect.isclass(obj):
        obj = obj()
    if hasattr(obj, "verify"):
        return as_verifier(obj)  # a verify-only class gets verify_batch
    if callable(obj):
        return RewardFunctionVerifier(obj, name=attr)
    raise UserError(f"verifier={name}: not a Verifier or a reward function")


__all__ = ["NumericVerifier", "MathVerifier", "CodeVerifier", "ExactVerifier", "RegexVerifier", "ChoiceVerifier",
           "ReasoningGymVerifier", "VerifierPool", "RewardFunctionVerifier", "reward_function", "VERIFIERS",
           "get_verifier"]
