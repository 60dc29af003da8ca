"""Math answers, with equivalence decided by math-verify (LaTeX and symbolic).

Extraction, from the formats real models write, in this order of trust:
`\\boxed{...}` (nested braces allowed), GSM8K's `#### X`, SCoRe's "Final Answer: The
final answer is $X$. I hope it is correct.", "The answer is X", and a last-number fallback
that is off by default. Known exploits score 0:
- no stated answer, or an empty one;
- echoing the question (a response that contains the question and nothing that states an
  answer extracts nothing);
- several final answers that disagree (hedging);
- an answer hidden in a long list of candidates ("1, 2, 3, ..., 42").

math-verify's timeouts use signals, which only work in a process's main thread: run this
verifier in the main thread or in `VerifierPool` worker processes, never in threads.
"""

from __future__ import annotations

import re
import threading

from selfevolve.types import Feedback, Task
from selfevolve.verifiers.pool import VerifierPool

ANCHORS = [
    ("boxed", None),
    ("gsm8k", re.compile(r"####\s*([^\n]+)")),
    ("score", re.compile(r"[Ff]inal [Aa]nswer:\s*[Tt]he final answer is\s*(.+?)\.?\s*I hope it is correct", re.S)),
    ("answer_is", re.compile(r"[Tt]he (?:final )?answer is:?\s*(.+?)(?:\.\s|\.$|\n|$)")),
]
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def boxed(text: str) -> list[str]:
    """Contents of every \\boxed{...} / \\fbox{...}, with nested braces.

    >>> boxed(r"so \\boxed{\\frac{1}{2}} and \\boxed{3}")
    ['\\\\frac{1}{2}', '3']
    """
    out = []
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            out.append(text[m.end(): i - 1].strip())
    return out


def extract_final_answers(response: str, last_number_fallback: bool = False) -> tuple[str, list[str]]:
    """(format, answers) for the first format the response uses.

    >>> extract_final_answers("#### 42")
    ('gsm8k', ['42'])
    >>> extract_final_answers("Final Answer: The final answer is $7$. I hope it is correct.")
    ('score', ['$7$'])
    """
    for name, pat in ANCHORS:
        found = boxed(response) if pat is None else [m.strip() for m in pat.findall(response)]
        found = [f for f in found if f]
        if found:
            return name, found
    if last_number_fallback:
        nums = NUMBER.findall(response)
        if nums:
            return "last_number", nums[-1:]
    return "none", []


def _as_math(s: str) -> str:
    s = s.strip().rstrip(".")
    return s if "$" in s or "\\(" in s else f"${s}$"


class MathVerifier:
    """Score 1 iff the response states one final answer (or several that agree)
    equivalent to `task.reference` under math-verify.

    >>> v = MathVerifier()
    >>> t = Task(id="t", prompt="Half of one?", reference="\\\\frac{1}{2}")
    >>> v.verify(t, "It is \\\\boxed{0.5}").score, v.verify(t, "The answer is 1/3.").score
    (1.0, 0.0)
    """

    name = "math"

    def __init__(self, last_number_fallback: bool = False, max_candidates: int = 3, timeout: int = 5):
        self.last_number_fallback = last_number_fallback
        self.max_candidates = max_candidates
        self.timeout = timeout
        self._pool = None

    def _equal(self, gold, answer: str) -> bool:
        from math_verify import parse, verify

        pred = parse(_as_math(answer), parsing_timeout=self.timeout)
        return bool(pred) and verify(gold, pred, timeout_seconds=self.timeout)

    def verify(self, task: Task, response: str) -> Feedback:
        from math_verify import parse

        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("MathVerifier uses signal-based timeouts: call it from a main thread or a VerifierPool")
        if task.reference is None:
            raise ValueError(f"task {task.id} has no reference answer")
        fmt, answers = extract_final_answers(response, self.last_number_fallback)
        details = {"format": fmt, "answers": answers}
        if not answers:
            return Feedback(score=0.0, text="no final answer found", details=details)
        gold = parse(_as_math(task.reference), parsing_timeout=self.timeout)
        if not gold:
            raise ValueError(f"task {task.id}: math-verify cannot parse the reference {task.reference!r}")
        gold_numbers = len(NUMBER.findall(task.reference))
        for a in answers:
            if len(NUMBER.findall(a)) > max(self.max_candidates, 2 * gold_numbers):
                return Feedback(score=0.0, text=f"the answer is a list of candidates: {a[:80]!r}", details=details)
        verdicts = [self._equal(gold, a) for a in answers]
        if len(answers) > 1 and not all(verdicts):
            agree = all(self._equal(parse(_as_math(answers[0])), b) for b in answers[1:])
            if not agree:
                return Feedback(score=0.0, text=f"several different final answers: {answers[:5]}", details=details)
        ok = all(verdicts)
        text = "correct" if ok else f"wrong answer {answers[-1][:80]!r}"
        return Feedback(score=float(ok), text=text, details=details)

    def verify_batch(self, tasks: list[Task], responses: list[str]) -> list[Feedback]:
        if threading.current_thread() is threading.main_thread():
            return [self.verify(t, r) for t, r in zip(tasks, responses)]
        if self._pool is None:  # started once, reused by every later call from a thread

            self._pool = VerifierPool(self, workers=2).start()
        return self._pool.map(tasks, responses)

    def __getstate__(self):  # a worker gets the settings, not the parent's pool
        return {**self.__dict__, "_pool": None}
