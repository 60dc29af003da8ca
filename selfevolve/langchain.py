"""LangChain integration (langchain-core): self-refinement as a Runnable, and any chat model
as a Policy.

    from langchain_core.prompts import ChatPromptTemplate
    from langchain_core.output_parsers import StrOutputParser
    refiner = SelfRefiner(HFPolicy("tiny"), max_turns=2)
    chain = ChatPromptTemplate.from_template("What is {expr}?") | refiner | StrOutputParser()
    chain.invoke({"expr": "7 + 8 - 3"})

`SelfRefiner` takes a string, a prompt value (the last human message is the task), a
message, a dict ({"prompt"|"question", "reference"|"answer", "id"}) or a Task, and returns
an AIMessage whose content is the final answer; `response_metadata` carries the trace id,
the number of turns and their scores. `batch` runs one batched loop over all inputs.
`ServerFeedback` is a Runnable that posts a verdict on an answer `selfevolve serve` logged
({"trace_id", "score", "text"} in, the server's acknowledgement out: `client.feedback_for`).
`LangChainPolicy` (in `policies/langchain.py`, re-exported here) wraps any `BaseChatModel`
(ChatOpenAI, a local model, ...) so it can be the policy of the loop or the judge of `JudgeCritic`.
"""

from __future__ import annotations

from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langchain_core.prompt_values import PromptValue
from langchain_core.runnables import Runnable, RunnableConfig

from selfevolve.loop import refine_batch
from selfevolve.policies.langchain import LangChainPolicy, to_langchain
from selfevolve.serving.client import feedback_for
from selfevolve.types import SamplingParams, Task

__all__ = ["SelfRefiner", "ServerFeedback", "LangChainPolicy", "to_langchain", "to_task"]


def to_task(value: Any, i: int = 0) -> Task:
    """Whatever flows through a chain -> a Task."""
    if isinstance(value, Task):
        return value
    if isinstance(value, str):
        return Task(id=f"lc-{i}", prompt=value)
    if isinstance(value, PromptValue):
        humans = [m for m in value.to_messages() if isinstance(m, HumanMessage)]
        return Task(id=f"lc-{i}", prompt=str(humans[-1].content) if humans else value.to_string())
    if isinstance(value, BaseMessage):
        return Task(id=f"lc-{i}", prompt=str(value.content))
    if isinstance(value, dict):
        prompt = value.get("prompt", value.get("question"))
        if not isinstance(prompt, str):
            raise ValueError("a dict input needs a 'prompt' (or 'question') string")
        ref = value.get("reference", value.get("answer"))
        return Task(id=str(value.get("id", f"lc-{i}")), prompt=prompt, reference=None if ref is None else str(ref))
    raise TypeError(
        f"SelfRefiner cannot take a {type(value).__name__}; give a str, prompt value, message, dict or Task"
    )


class SelfRefiner(Runnable):
    """The selfevolve loop as an LCEL step: answer, get feedback, revise."""

    def __init__(self, policy, verifier=None, critic=None, max_turns: int = 3, sampling: SamplingParams | None = None,
                 store=None):
        self.policy, self.verifier, self.critic, self.max_turns = policy, verifier, critic, max_turns
        self.sampling = sampling or SamplingParams(temperature=0.0, max_new_tokens=128)
        self.store = store  # a TraceStore to keep every trace, or None

    def _run(self, inputs: list) -> list[AIMessage]:
        traces = refine_batch([to_task(x, i) for i, x in enumerate(inputs)], self.policy, self.verifier, self.critic,
                              self.max_turns, sampling=self.sampling, recipe="langchain")
        if self.store is not None:
            self.store.append(traces)
        return [AIMessage(content=t.final, response_metadata={"trace_id": t.id, "turns": len(t.turns),
                                                              "scores": [x.score for x in t.turns]}) for t in traces]

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> AIMessage:
        return self._call_with_config(lambda x: self._run([x])[0], input, config)

    def batch(self, inputs: list, config=None, *, return_exceptions: bool = False, **kwargs: Any) -> list[AIMessage]:
        if not inputs:
            return []
        return self._run(list(inputs))


class ServerFeedback(Runnable):
    """Feedback on a served answer as a chain step: invoke({"trace_id": ..., "score": ...,
    "text": ...}) posts it to the server at `base_url` (`client.feedback_for`)."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000/v1", api_key: str | None = None):
        self.base_url, self.api_key = base_url, api_key

    def invoke(self, input: dict, config: RunnableConfig | None = None, **kwargs: Any) -> dict:
        return feedback_for(input["trace_id"], input["score"], input.get("text"), base_url=self.base_url,
                            api_key=self.api_key)
