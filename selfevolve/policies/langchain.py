"""LangChainPolicy: any langchain-core `BaseChatModel` (ChatOpenAI, a local chat model, ...) as
a selfevolve Policy, so it can answer in the loop or judge as `JudgeCritic`'s policy."""

from __future__ import annotations

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage

from selfevolve.errors import UserError
from selfevolve.types import Conversation, SamplingParams, Turn


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
