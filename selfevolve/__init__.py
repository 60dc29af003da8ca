"""selfevolve: a framework in which a language model improves itself.

    >>> import selfevolve
    >>> policy = selfevolve.HFPolicy("tiny")                      # doctest: +SKIP
    >>> trace = selfevolve.refine("What is 47 + 38 - 12?", policy)  # doctest: +SKIP
    >>> trace.final                                               # doctest: +SKIP

Names are imported lazily so `import selfevolve` (and the CLI's start) stays fast.
"""

from importlib import import_module

_EXPORTS = {"Task": "types", "Feedback": "types", "Turn": "types", "Trace": "types", "SamplingParams": "types",
            "Policy": "types", "Verifier": "types", "Critic": "types", "HFPolicy": "policies", "refine": "build",
            "refine_batch": "loop", "evaluate": "evaluation.evaluate", "TraceStore": "data.store",
            "load_tasks": "data.sources", "self_correction_metrics": "evaluation.metrics",
            "feedback_for": "serving.client"}

__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'selfevolve' has no attribute {name!r}")
