"""The one vocabulary of selfevolve (docs/architecture.md, "Core types"): Task, Feedback, Turn,
Trace, and the protocols Policy, AdapterServing, Verifier, Critic, TurnPolicy, each stating every method
the code calls on it (`as_verifier` / `as_critic` adapt single-item third-party objects).

Everything that crosses a boundary (a file, the CLI, HTTP, the trace store) is one of these
pydantic models, so malformed input fails at the edge with a message naming the field.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Protocol, runtime_checkable

import networkx as nx
from pydantic import BaseModel, ConfigDict, Field, model_validator

Message = dict[str, str]  # {"role": "user"|"assistant"|"system", "content": "..."}
Conversation = list[Message]


class Task(BaseModel):
    """One problem. `reference` is the gold answer (or a full solution); code tasks carry
    `tests` and `entry_point`."""

    model_config = ConfigDict(extra="forbid")

    id: str
    prompt: str
    reference: str | None = None
    tests: list[str] | str | None = None
    entry_point: str | None = None
    meta: dict[str, Any] = Field(default_factory=dict)


class Feedback(BaseModel):
    """One value for every kind of signal: a scalar `score`, a natural-language `text`, or
    both. `source` says who produced it (`verifier`, `self`, `judge`, ...). A critic's
    `verdict` is "correct" when it sees nothing to fix (the loop stops there), "wrong" when
    it asks for a revision, None when no verdict was given (a verifier's feedback)."""

    model_config = ConfigDict(extra="forbid")

    score: float | None = None
    text: str | None = None
    source: str = "verifier"
    verdict: Literal["correct", "wrong"] | None = None
    details: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _verdict_from_details(cls, data: Any) -> Any:
        """Traces stored before `verdict` was a field kept it in details["verdict"]."""
        if isinstance(data, dict) and isinstance(data.get("details"), dict) and "verdict" in data["details"]:
            details = dict(data["details"])
            verdict = details.pop("verdict")
            data = {**data, "details": details, "verdict": data.get("verdict") or verdict}
        return data


class Turn(BaseModel):
    """One attempt. `feedback` is the verifier's judgement of `response` (the reward);
    `critique` is the text a critic wrote about it, shown to the policy before the next
    turn. Either may be absent (no verifier, no critic, or the last turn). `token_ids` are
    the sampled tokens, ending with the stop token when one ended the turn (as vLLM reports
    them), and `logprobs` theirs, one each, where the policy reports them; `tokens`, the
    sampled tokens as text, where a policy reports text but not ids (an OpenAI endpoint
    without vLLM's `return_tokens_as_token_ids`);
    `top_logprobs`, where asked for (SamplingParams.top_logprobs), the most likely tokens at
    each step with their log-probs;
    `finish_reason` is "stop" (the model ended its turn) or "length" (cut at the budget: it
    is scored as given, and never trained with an end-of-turn it did not produce)."""

    model_config = ConfigDict(extra="forbid")

    response: str
    feedback: Feedback | None = None
    critique: Feedback | None = None
    token_ids: list[int] | None = None
    tokens: list[str] | None = None
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    finish_reason: Literal["stop", "length"] | None = None

    @property
    def score(self) -> float | None:
        return self.feedback.score if self.feedback else None


class LoggedAnswer(BaseModel):
    """An answer a server logged, as the recipes that learn from traffic take it
    (`sources.logged_tasks` attaches a task's to `task.meta["logged"]`; the conversation it was
    sampled in is the task's, `task_messages`): the trace it is, its text and the token ids
    the engine sampled (None where unknown), its score and whose verdict that is (`user`,
    `verifier`), the version that answered, and every turn when it was a refinement."""

    model_config = ConfigDict(extra="forbid")

    trace_id: str
    response: str
    token_ids: list[int] | None = None
    score: float | None = None
    source: str | None = None
    policy_version: str | None = None
    turns: list[Turn] | None = None


class Trace(BaseModel):
    """One episode: a task, its turns, and where it came from (policy version = adapter
    id, recipe, round). `parent_id` links traces of a branching episode (best-of-N,
    refinement trees); `graph()` gives the networkx view of one episode."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    task: Task
    turns: list[Turn] = Field(default_factory=list)
    policy_version: str | None = None
    recipe: str | None = None
    run: str | None = None
    round: int = 0
    parent_id: str | None = None
    meta: dict[str, Any] = Field(default_factory=dict)
    created: float = Field(default_factory=time.time)
    finished: float | None = None

    @property
    def final(self) -> str:
        """The last response (the answer the loop returns)."""
        return self.turns[-1].response if self.turns else ""

    def correct_at(self, k: int) -> bool:
        """Was the answer standing after turn k (1-based) scored 1? A trace that stopped
        early keeps its last answer, so later turns inherit it."""
        if not self.turns:
            return False
        turn = self.turns[min(k, len(self.turns)) - 1]
        return turn.score is not None and turn.score >= 1.0

    def graph(self) -> nx.DiGraph:
        """Directed graph of the episode: task -> turn 1 -> turn 2 -> ...; each turn node
        holds its response, score and critique text."""
        g = nx.DiGraph()
        g.add_node("task", kind="task", prompt=self.task.prompt, task_id=self.task.id)
        prev = "task"
        for i, t in enumerate(self.turns, 1):
            node = f"turn{i}"
            g.add_node(node, kind="turn", index=i, response=t.response, score=t.score,
                       critique=t.critique.text if t.critique else None)
            g.add_edge(prev, node)
            prev = node
        return g


def branching_graph(traces: list[Trace]) -> nx.DiGraph:
    """Graph over several traces linked by `parent_id` (a refinement tree or best-of-N):
    nodes are trace ids, edges go parent -> child."""
    g = nx.DiGraph()
    for t in traces:
        g.add_node(t.id, final=t.final, score=t.turns[-1].score if t.turns else None)
    for t in traces:
        if t.parent_id is not None:
            g.add_edge(t.parent_id, t.id)
    return g


class SamplingParams(BaseModel):
    """Decoding settings shared by every Policy. temperature=0 means greedy."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(128, ge=1)
    n: int = Field(1, ge=1)
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = Field(0, ge=0, le=20, description="also the k most likely tokens at each step")
    stop: list[str] | None = Field(None, max_length=4,
                                   description="strings that end an answer (not included), as OpenAI's `stop`")


def task_messages(task: Task, prompt: str | None = None) -> Conversation:
    """The conversation a task poses, ending with its user message: the one its request
    carried (`meta["messages"]`: a system message, earlier turns), else the prompt alone.
    `prompt` replaces that last user message (STaR's hinted prompt). Logged answers are
    trained, and their tasks re-sampled and evaluated, in this context.

    >>> task_messages(Task(id="a", prompt="2+2?"))
    [{'role': 'user', 'content': '2+2?'}]
    """
    logged = task.meta.get("messages")
    msgs = [dict(m) for m in logged] if isinstance(logged, list) and logged else [
        {"role": "user", "content": task.prompt}]
    if prompt is not None:
        msgs[-1] = {"role": "user", "content": prompt}
    return msgs


def first_stop(text: str, stop: str | list[str] | None) -> int:
    """Where the first of the `stop` strings begins in `text` (-1: none does)."""
    stops = [stop] if isinstance(stop, str) else (stop or [])
    return min((i for i in (text.find(x) for x in stops if x) if i >= 0), default=-1)


def cut_at_stop(turn: Turn, stop: str | list[str] | None) -> Turn:
    """The answer up to the first of the request's `stop` strings (not included), as OpenAI
    and vLLM return it, finish_reason "stop". The cut answer's sampled ids and log-probs no
    longer match its text, so they are dropped: a learner re-tokenises it (`meta.tokens`)."""
    at = first_stop(turn.response, stop)
    if at < 0:
        return turn
    return turn.model_copy(update={"response": turn.response[:at], "token_ids": None, "logprobs": None,
                                   "top_logprobs": None, "finish_reason": "stop"})


@runtime_checkable
class Policy(Protocol):
    """Anything that answers conversations. `generate` returns, per conversation, a list of
    `sampling.n` Turns (response text, token ids and logprobs where available). With
    `sampling.seed` set, conversation i is sampled from seed + i (its own stream, as vLLM
    seeds each request).
    `active_adapter` names the adapter answering (None: the base model), recorded on every
    Trace as its policy version; a policy that cannot load adapters raises UserError."""

    def generate(self, conversations: list[Conversation], sampling: SamplingParams) -> list[list[Turn]]: ...

    def load_adapter(self, path: str, name: str) -> None: ...

    @property
    def active_adapter(self) -> str | None: ...


@runtime_checkable
class AdapterServing(Policy, Protocol):
    """A policy that serves trained adapters: what verified sync (`publish.publish`) and
    `selfevolve serve` need. HFPolicy, VLLMPolicy and OpenAIPolicy are; LangChainPolicy is not."""

    def unload_adapter(self, name: str) -> None: ...

    def set_adapter(self, name: str | None) -> None: ...

    def prompt_logprobs(self, text: str) -> list[float]:
        """log p(t_i | t_<i) for every token of a plain text after the first, under the active
        adapter (the canary)."""
        ...


@runtime_checkable
class Servable(AdapterServing, Protocol):
    """Everything `selfevolve serve` calls on its policy (checked once, at start): the engine
    side of an OpenAI-compatible server. HFPolicy is one; vLLM has its own server
    (`vllm serve`), which `selfevolve serve model=URL` fronts (selfevolve/serving/gateway.py)."""

    path: Any             # where the weights were loaded from (the served model's name and root)
    tokenizer: Any        # prompt lengths and completions' tokens
    max_positions: int    # the context: longer prompts are a 400

    @property
    def adapters(self) -> dict[str, str]:
        """name -> path of every loaded adapter."""
        ...

    def generate(self, conversations: list[Conversation], sampling: SamplingParams,
                 seeds: list[int | None] | None = None, on_token: list | None = None) -> list[list[Turn]]:
        """As Policy.generate; `seeds`, one per conversation, replace seed + i, so requests
        that differ only in their seed are answered in one batch; `on_token[i]`, where given,
        is called as (sample, token id) with each token of conversation i as it is generated."""
        ...

    def complete(self, prompts: list[str | list[int]], sampling: SamplingParams,
                 seeds: list[int | None] | None = None, on_token: list | None = None) -> list[list[Turn]]:
        """Continue raw texts or token ids (no chat template); `on_token` as in `generate`."""
        ...

    def encode_prompts(self, conversations: list[Conversation]) -> list[list[int]]: ...

    def prompt_token_logprobs(self, prompt: str | list[int], top: int = 0) \
            -> tuple[list[int], list[float | None], list[dict[int, float] | None]]: ...


@runtime_checkable
class Verifier(Protocol):
    """Deterministic, trusted scoring: Feedback with a score in [0, 1]. The loop and the
    recipes call `verify_batch`; `as_verifier` gives a verify-only object one."""

    def verify(self, task: Task, response: str) -> Feedback: ...

    def verify_batch(self, tasks: list[Task], responses: list[str]) -> list[Feedback]: ...


@runtime_checkable
class Critic(Protocol):
    """Writes feedback (text and a `verdict`) on the turns so far; verdict "correct" stops
    the loop. The loop calls `critique_batch`; `as_critic` gives a critique-only object one."""

    def critique(self, task: Task, turns: list[Turn]) -> Feedback: ...

    def critique_batch(self, tasks: list[Task], turns_lists: list[list[Turn]]) -> list[Feedback]: ...


@runtime_checkable
class TurnPolicy(Protocol):
    """Between attempts (selfevolve/turns.py): for each still-going trace, the user message
    that asks for the next attempt, or None to end it; `respond` may write the latest turn's
    critique. Never called with no traces. `window` is how many of the latest attempts the
    next prompt shows (None: all)."""

    window: int | None

    def respond(self, traces: list[Trace]) -> list[str | None]: ...


class _OneByOne:
    """A third-party verifier or critic with only the single-item method, given the batched
    one by calling it per item (and every other attribute passed through)."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        if name == "inner":  # not set yet (unpickling in a VerifierPool worker)
            raise AttributeError(name)
        return getattr(self.inner, name)

    def verify_batch(self, tasks: list[Task], responses: list[str]) -> list[Feedback]:
        return [self.inner.verify(t, r) for t, r in zip(tasks, responses)]

    def critique_batch(self, tasks: list[Task], turns_lists: list[list[Turn]]) -> list[Feedback]:
        return [self.inner.critique(t, ts) for t, ts in zip(tasks, turns_lists)]


def as_verifier(obj) -> Verifier:
    """`obj` as a full Verifier: itself if it has `verify_batch`, else wrapped.

    >>> class Yes:
    ...     def verify(self, task, response): return Feedback(score=1.0)
    >>> v = as_verifier(Yes())
    >>> isinstance(v, Verifier), [f.score for f in v.verify_batch([Task(id="t", prompt="p")], ["a"])]
    (True, [1.0])
    """
    if not callable(getattr(obj, "verify", None)):
        raise TypeError(f"{type(obj).__name__} is not a Verifier: it has no verify(task, response)")
    return obj if callable(getattr(obj, "verify_batch", None)) else _OneByOne(obj)


def as_critic(obj) -> Critic:
    """`obj` as a full Critic: itself if it has `critique_batch`, else wrapped."""
    if not callable(getattr(obj, "critique", None)):
        raise TypeError(f"{type(obj).__name__} is not a Critic: it has no critique(task, turns)")
    return obj if callable(getattr(obj, "critique_batch", None)) else _OneByOne(obj)
