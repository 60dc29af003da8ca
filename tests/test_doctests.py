"""The `>>>` examples in docstrings are part of the documentation; they must run."""

import doctest
import importlib

import pytest

MODULES = ["selfevolve.arith", "selfevolve.metrics", "selfevolve.store", "selfevolve.verifiers.numeric",
           "selfevolve.types", "selfevolve.policies.hf", "selfevolve"]


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
