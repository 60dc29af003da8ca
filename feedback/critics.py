"""Critics: who writes the natural-language feedback the policy revises against.

    SelfCritic      the policy critiques its own answer (SELF / Self-Refine)
    JudgeCritic     another policy critiques (a bigger model, a LangChain chat model, an
                    OpenAI-compatible endpoint)
    VerifierCritic  a verifier's result, put into words (expected vs. got, the failing test
                    and its traceback tail); the reference stays hidden unless reveal_reference

Each has `critique(task, turns) -> Feedback` (the Critic protocol) and a batched
`critique_batch(tasks, turns_lists)` the loop uses, so a critique round costs one batched
generation. `Feedback.verdict` is "correct" when the critic sees nothing to fix; the loop
stops there. Reflexion-style memory: the critiques already written for earlier attempts are
passed to the critic (at most `memory` of them), and the loop shows them to the policy.
"""

from __future__ import annotations

import re

from selfevolve.feedback import prompts
from selfevolve.types import Feedback, SamplingParams, Task, Turn, Verifier

_VERDICT_LINE = re.compile(r"^\W*verdict\W*[:=\-]\W*(correct|right|wrong|incorrect)\b", re.I | re.M)
_QUALIFIED = re.compile(r"\b(not|n't|but|however|except|although|unless)\b|n't\b", re.I)


def parse_verdict(text: str, no_errors: str = prompts.NO_ERRORS) -> str:
    """The critic's verdict in the prompt's explicit format: a last line `Verdict: correct`
    (or `wrong`) decides; else "correct" iff one sentence states the prompt's phrase (`The
    answer has no errors.`) unqualified — not negated, not followed by "but". Anything
    else asks for a revision.

    >>> [parse_verdict(t) for t in ("The answer has no errors.", "I can't say it has no errors.",
    ...  "No errors in step 1, but 8 - 3 is 5.", "Step 2 is wrong.\\nVerdict: wrong", "Verdict: correct")]
    ['correct', 'wrong', 'wrong', 'wrong', 'correct']
    """
    explicit = _VERDICT_LINE.findall(text)
    if explicit:
        return "correct" if explicit[-1].lower() in ("correct", "right") else "wrong"
    sentences = re.split(r"(?<=[.!?])\s+|\n+", text)
    ok = any(no_errors.lower() in s.lower() and not _QUALIFIED.search(s) for s in sentences)
    return "correct" if ok else "wrong"


def _notes(turns: list[Turn], memory: int) -> str:
    earlier = [t.critique.text for t in turns[:-1] if t.critique is not None and t.critique.text]
    earlier = earlier[-memory:] if memory > 0 else []
    return prompts.NOTES.format(notes="\n".join(f"- {c}" for c in earlier)) if earlier else ""


class PolicyCritic:
    """A policy writes the critique from a template; the verdict is read from its text
    (`parse_verdict`: the format the template asks for)."""

    source = "policy"

    def __init__(self, policy, template: str = prompts.CRITIQUE, sampling: SamplingParams | None = None,
                 memory: int = 3, no_errors: str = prompts.NO_ERRORS):
        for field in ("{question}", "{answer}"):
            if field not in template:
                raise ValueError(f"critique template must contain {field}")
        self.policy, self.template, self.memory, self.no_errors = policy, template, memory, no_errors.lower()
        self.sampling = sampling or SamplingParams(temperature=0.0, max_new_tokens=128)

    def prompt(self, task: Task, turns: list[Turn]) -> str:
        notes = _notes(turns, self.memory) if "{notes}" in self.template else ""
        return self.template.format(question=task.prompt, answer=turns[-1].response, notes=notes)

    def critique_batch(self, tasks: list[Task], turns_lists: list[list[Turn]]) -> list[Feedback]:
        convs = [[{"role": "user", "content": self.prompt(t, turns)}] for t, turns in zip(tasks, turns_lists)]
        outs = self.policy.generate(convs, self.sampling) if convs else []
        return [Feedback(text=o[0].response, source=self.source,
                         verdict=parse_verdict(o[0].response, self.no_errors),
                         details={"critic_adapter": self.policy.active_adapter})
                for o in outs]

    def critique(self, task: Task, turns: list[Turn]) -> Feedback:
        return self.critique_batch([task], [turns])[0]


class SelfCritic(PolicyCritic):
    """The served policy critiques itself (pass the same policy object the loop uses)."""

    source = "self"


class JudgeCritic(PolicyCritic):
    """A different policy critiques: any Policy, e.g. `LangChainPolicy(chat_model)` or
    `OpenAIPolicy(base_url=...)`."""

    source = "judge"


class VerifierCritic:
    """A verifier's judgement in words: what was wrong (the verifier's reason, the first
    failing test and its traceback tail for code), never the reference unless
    `reveal_reference=True`."""

    source = "verifier"

    def __init__(self, verifier: Verifier, reveal_reference: bool = False, memory: int = 3, tail_lines: int = 6):
        self.verifier, self.reveal_reference, self.memory, self.tail_lines = (verifier, reveal_reference, memory,
                                                                              tail_lines)

    def _words(self, task: Task, fb: Feedback) -> str:
        if fb.score is not None and fb.score >= 1.0:
            return prompts.VERIFIER_RIGHT
        lines = (fb.text or "it does not pass the check").rstrip(".").splitlines()
        why = "\n".join(lines[:1] + lines[1:][-self.tail_lines :])  # the reason + the traceback tail
        failing = next((t for t in fb.details.get("tests", []) if not t.get("passed")), None)
        if failing and isinstance(task.tests, list) and failing["test"] < len(task.tests):
            why += f"\nThe failing test: {task.tests[failing['test']].strip()}"
        if task.reference and not self.reveal_reference:
            why = why.replace(task.reference.strip(), "[hidden]")  # e.g. a regex verifier quotes its pattern
        text = prompts.VERIFIER_WRONG.format(why=why)
        if self.reveal_reference and task.reference is not None:
            text += prompts.VERIFIER_EXPECTED.format(reference=task.reference)
        return text

    def critique_batch(self, tasks: list[Task], turns_lists: list[list[Turn]]) -> list[Feedback]:
        need = [i for i, turns in enumerate(turns_lists) if turns[-1].feedback is None]
        fresh = (
            dict(
                zip(
                    need,
                    self.verifier.verify_batch([tasks[i] for i in need], [turns_lists[i][-1].response for i in need]),
                )
            )
            if need
            else {}
        )
        out = []
        for i, (task, turns) in enumerate(zip(tasks, turns_lists)):
            fb = fresh.get(i) or turns[-1].feedback
            text = self._words(task, fb) + _notes(turns, self.memory)
            out.append(Feedback(text=text, source=self.source, details={"score": fb.score},
                                verdict="correct" if fb.score is not None and fb.score >= 1.0 else "wrong"))
        return out

    def critique(self, task: Task, turns: list[Turn]) -> Feedback:
        return self.critique_batch([task], [turns])[0]


CRITICS = ("none", "self", "verifier", "judge")


def get_critic(name: str, policy=None, verifier: Verifier | None = None, judge=None, template: str | None = None,
               reveal_reference: bool = False, memory: int = 3, max_new_tokens: int = 128):
    """The critic `critic=NAME` selects: none | self | verifier | judge."""
    from selfevolve.errors import UserError

    sampling = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
    kw = {"template": template} if template else {}
    if name in ("none", None):
        return None
    if name == "self":
        return SelfCritic(policy, sampling=sampling, memory=memory, **kw)
    if name == "verifier":
        if verifier is None:
            raise UserError("critic=verifier needs a verifier= (e.g. numeric, math, code)")
        return VerifierCritic(verifier, reveal_reference=reveal_reference, memory=memory)
    if name == "judge":
        if judge is None:
            raise UserError("critic=judge needs judge= (a model directory, `tiny`, or an http(s):// endpoint)")
        return JudgeCritic(judge, sampling=sampling, memory=memory, **kw)
    raise UserError(f"critic={name}: choose one of {', '.join(CRITICS)}")
