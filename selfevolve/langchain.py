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
`LangChainPolicy` wraps any `BaseChatModel` (ChatOpenAI, a local model, ...) so it can be
the policy of the loop or the judge of `JudgeCritic`.
"""

from __future__ import annotations

from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from langchain_core.prompt_values import PromptValue
from langchain_core.runnables import Runnable, RunnableConfig

from .config import UserError
from .loop import refine_batch
from .types import Conversation, SamplingParams, Task, Turn


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
    raise TypeError(f"SelfRefiner cannot take a {type(value).__name__}; give a str, prompt value, message, dict or Task")


class SelfRefiner(Runnable):
    """The selfevolve loop as an LCEL step: answer, get feedback, revise."""

    def __init__(self, policy, verifier=None, critic=None, max_turns: int = 3, sampling: SamplingParams | None = None,
                 store=None):
        self.policy, self.verifier, self.critic, self.max_turns = policy, verifier, critic, max_turns
        self.sampling = sampling or SamplingParams(temperature=0.0, max_new_tokens=128)
        self.store = store  # a TraceStore to keep every trace, or None

    def _run(self, inputs: list) -> list[AIMessage]:
        traces = refine_batch([to_task(x, i) for i, x in enumerate(inputs)], self.policy, self.verifier, self.critic,
                              self.max_turns, sampling=self.sampling, stop_when_correct=False, recipe="langchain")
        if self.store is not None:
            self.store.append(traces)
        return [AIMessage(content=t.final, response_metadata={"trace_id": t.id, "turns": len(t.turns),
                                                               "scores": [x.score for x in t.turns]})
                for t in traces]

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> AIMessage:
        return self._call_with_config(lambda x: self._run([x])[0], input, config)

    def batch(self, inputs: list, config=None, *, return_exceptions: bool = False, **kwargs: Any) -> list[AIMessage]:
        if not inputs:
            return []
        return self._run(list(inputs))


def to_langchain(conversation: Conversation) -> list[BaseMessage]:
    kinds = {"system": SystemMessage, "user": HumanMessage, "assistant": AIMessage}
    return [kinds[m["role"]](content=m["content"]) for m in conversation]


class LangChainPolicy:
    """Any LangChain `BaseChatModel` as a selfevolve Policy (generation only: a hosted chat
    model has no adapters to load). Sampling settings are bound as `temperature` and
    `max_tokens`, the names most chat models take; `bind_sampling=False` leaves them out."""

    def __init__(self, chat_model, bind_sampling: bool = True, max_concurrency: int = 16):
        self.chat_model, self.bind_sampling, self.max_concurrency = chat_model, bind_sampling, max_concurrency

    @property
    def active_adapter(self) -> str | None:
        return None

    def load_adapter(self, path: str, name: str) -> None:
        raise UserError("a LangChain chat model cannot load LoRA adapters; serve the model with `selfevolve serve` "
                        "or vLLM and use OpenAIPolicy")

    def set_adapter(self, name: str | None) -> None:
        if name is not None:
            self.load_adapter("", name)

    def generate(self, conversations: list[Conversation], sampling: SamplingParams | None = None) -> list[list[Turn]]:
        sampling = sampling or SamplingParams()
        model = self.chat_model.bind(temperature=sampling.temperature, max_tokens=sampling.max_new_tokens) \
            if self.bind_sampling else self.chat_model
        msgs = [to_langchain(c) for c in conversations for _ in range(sampling.n)]
        outs = model.batch(msgs, config={"max_concurrency": self.max_concurrency}) if msgs else []
        turns = [Turn(response=str(o.content).strip()) for o in outs]
        return [turns[i: i + sampling.n] for i in range(0, len(turns), sampling.n)]
