"""Code: run a model-written program against the task's tests in the sandbox
(`sandbox.py` says how it is isolated).

Test styles:
- HumanEval: `task.prompt` + completion, then `task.tests` (a `check(candidate)` function)
  called on `task.entry_point`; every statement of `check` is run on its own, and each
  statement containing an `assert` (a loop of asserts too) counts as one test.
- MBPP: `task.tests` is a list of assert lines, each one test.

Success means every test ran to completion and passed: the harness sends a final `done`
line after the last test, so `sys.exit(0)` / `os._exit(0)` before the asserts earns
nothing; values returned by the program's functions must be plain Python data (`type(x)`
exactly int, str, list, ...), so an object whose `__eq__` always returns True fails; the
harness keeps its own references to `compile`, `exec`, `os.write` and resets tracing
hooks before each test, so patching builtins or the harness from the program does not
help; the tests travel over a pipe and are never written where the program could read
them. Per-test pass/fail and the traceback tail are in `Feedback.details["tests"]`.
"""

from __future__ import annotations

import re
import secrets

from selfevolve.types import Feedback, Task
from selfevolve.verifiers.sandbox import Sandbox, namespaces_available, user_processes


def extract_code(response: str) -> str:
    """The program in a response: the fenced ```python blocks joined, else the whole text.

    >>> extract_code("Here:\\n```python\\ndef f():\\n    return 1\\n```\\nDone.")
    'def f():\\n    return 1'
    """
    blocks = re.findall(r"```(?:python|py)?[ \t]*\n(.*?)```", response, re.S)
    return "\n\n".join(b.strip("\n") for b in blocks) if blocks else response


class CodeVerifier:
    """Run a program against a task's tests in a sandbox; score 1 iff every test passed.

    >>> v = CodeVerifier(timeout=5)
    >>> t = Task(id="add", prompt="def add(a, b):\\n", entry_point="add",
    ...          tests="def check(candidate):\\n    assert candidate(1, 2) == 3\\n")
    >>> v.verify(t, "    return a + b\\n").score
    1.0
    >>> v.verify(t, "    return a - b\\n").score
    0.0
    """

    name = "code"

    def __init__(self, timeout: float = 10.0, memory_mb: int = 1024, max_file_mb: int = 16,
                 max_processes: int = 16, max_open_files: int = 64, isolation: str = "auto"):
        if isolation not in ("auto", "namespaces", "process"):
            raise ValueError("isolation must be auto, namespaces or process")
        if isolation == "namespaces" and not namespaces_available():
            raise RuntimeError("namespace isolation is not available here (needs root and util-linux unshare)")
        self.timeout, self.memory_mb, self.max_file_mb = timeout, memory_mb, max_file_mb
        self.max_processes, self.max_open_files = max_processes, max_open_files
        self.isolation = isolation
        self.sandbox = Sandbox(namespaces=isolation != "process" and namespaces_available())

    @staticmethod
    def reference_response(task: Task) -> str:
        """What `selfevolve check` submits: the canonical solution itself."""
        return task.reference or ""

    def _program(self, task: Task, response: str) -> dict:
        code = extract_code(response)
        if isinstance(task.tests, str):
            if not task.entry_point:
                raise ValueError(f"task {task.id}: HumanEval-style tests need an entry_point")
            program = code if f"def {task.entry_point}" in code else task.prompt + code
            return {"style": "humaneval", "program": program, "tests": task.tests, "entry_point": task.entry_point}
        if isinstance(task.tests, list) and task.tests:
            return {"style": "asserts", "program": code, "tests": task.tests, "entry_point": task.entry_point}
        raise ValueError(f"task {task.id} has no tests to run")

    def verify(self, task: Task, response: str) -> Feedback:
        job = self._program(task, response)
        nonce = secrets.token_hex(16)
        limits = {"cpu": int(self.timeout) + 1, "memory": self.memory_mb << 20, "fsize": self.max_file_mb << 20,
                  "nofile": self.max_open_files, "nproc": user_processes() + self.max_processes}
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
        reply = self.sandbox.run(job, nonce, self.timeout, limits, env)
        return self._feedback(reply["results"], nonce, reply["timed_out"], reply["returncode"], reply["output"],
                              reply["seconds"])

    def _feedback(self, raw: str, nonce: str, timed_out: bool, returncode: int | None, output: str,
                  seconds: float) -> Feedback:
        tests, done, load_error = [], None, None
        for line in raw.splitlines():
            parts = line.split("\t", 4)
            if len(parts) != 5 or parts[0] != nonce:
                continue  # not written by the harness
            _, kind, i, ok, msg = parts
            msg = msg.replace("\\n", "\n")
            if kind == "test":
                tests.append({"test": int(i), "passed": ok == "1", "detail": msg})
            elif kind == "done":
                done = ok == "1"
            elif kind == "load":
                load_error = msg
        details = {"tests": tests, "passed": sum(t["passed"] for t in tests), "total": len(tests),
                   "timed_out": timed_out, "returncode": returncode, "seconds": round(seconds, 3),
                   "output_tail": output}
        if load_error is not None:
            return Feedback(score=0.0, text=f"the program failed before the tests:\n{load_error}", details=details)
        if timed_out:
            return Feedback(score=0.0, text=f"timed out after {self.timeout:g} s ({details['passed']} tests passed)",
                            details=details)
        if done is None:
            return Feedback(score=0.0, text=f"the program stopped before the tests finished (exit code {returncode})",
                            details=details)
        if done and tests:
            return Feedback(score=1.0, text=f"all {len(tests)} tests passed", details=details)
        failed = next((t for t in tests if not t["passed"]), None)
        why = f"test {failed['test']} failed:\n{failed['detail']}" if failed else "no tests ran"
        return Feedback(score=0.0, text=f"{details['passed']}/{len(tests)} tests passed; {why}", details=details)

    def verify_batch(self, tasks: list[Task], responses: list[str]) -> list[Feedback]:
        return [self.verify(t, r) for t, r in zip(tasks, responses)]
