"""Policies: everything that answers conversations (docs/architecture.md, "Core types").

    HFPolicy        transformers in process (CPU or GPU); the training-side default
    VLLMPolicy      vllm.LLM with LoRA requests (GPU; `pip install selfevolve[vllm]`)
    OpenAIPolicy    any OpenAI-compatible endpoint: vllm serve, SGLang, `selfevolve serve`
    LangChainPolicy any LangChain chat model
"""

from __future__ import annotations

from ..errors import UserError
from ..models import resolve_device, resolve_model_path
from .hf import HFPolicy

__all__ = ["HFPolicy", "OpenAIPolicy", "VLLMPolicy", "LangChainPolicy", "load_policy", "resolve_model_path",
           "resolve_device"]

POLICIES = ("hf", "vllm", "openai")


def __getattr__(name):  # lazily: openai, vllm and langchain-core are imported only when used
    if name == "OpenAIPolicy":
        from .openai import OpenAIPolicy
        return OpenAIPolicy
    if name == "VLLMPolicy":
        from .vllm import VLLMPolicy
        return VLLMPolicy
    if name == "LangChainPolicy":
        from .langchain import LangChainPolicy
        return LangChainPolicy
    raise AttributeError(name)


def load_policy(model: str, policy: str = "auto", **kwargs):
    """The policy for `model=` and `policy=`: an http(s):// URL is an OpenAI-compatible
    endpoint (`policy=openai`), anything else a model directory or `tiny`, served by
    transformers (`policy=hf`, the default) or vLLM (`policy=vllm`)."""
    if policy == "auto":
        policy = "openai" if model.startswith(("http://", "https://")) else "hf"
    if policy == "openai":
        from .openai import OpenAIPolicy
        return OpenAIPolicy(base_url=model, **kwargs)
    if policy == "vllm":
        from .vllm import VLLMPolicy
        return VLLMPolicy(model, **kwargs)
    if policy == "hf":
        return HFPolicy(model, **kwargs)
    raise UserError(f"policy={policy}: choose one of {', '.join(POLICIES)}")
