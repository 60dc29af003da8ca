"""Verifiers: trusted, deterministic scoring (installed as `selfevolve.verifiers`).

`get_verifier(name)` takes a short name from VERIFIERS or a dotted import path
(`package.module:Class` or `package.module.Class`) for anything else.
"""

from __future__ import annotations

import importlib

from .numeric import NumericVerifier

VERIFIERS = {"numeric": NumericVerifier}


def get_verifier(name: str):
    from selfevolve.config import UserError

    if name in VERIFIERS:
        return VERIFIERS[name]()
    if "." not in name and ":" not in name:
        raise UserError(f"unknown verifier={name!r}; choose one of {sorted(VERIFIERS)} or give a dotted import path")
    mod, _, attr = name.replace(":", ".").rpartition(".")
    try:
        obj = getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
        raise UserError(f"verifier={name}: cannot import ({e})") from None
    return obj() if isinstance(obj, type) else obj


__all__ = ["NumericVerifier", "VERIFIERS", "get_verifier"]
