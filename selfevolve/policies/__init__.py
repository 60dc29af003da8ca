"""Policies: everything that answers conversations (docs/architecture.md, "Core types").

    HFPolicy        transformers in process (CPU or GPU); the training-side default
    VLLMPolicy      vllm.LLM with LoRA requests (CPU or GPU; vLLM in its own virtualenv, bench/vllm-env.sh)
    OpenAIPolicy    any OpenAI-compatible endpoint: vllm serve, SGLang, `selfevolve serve`
    FleetPolicy     several such endpoints serving one model (model=URL1,URL2)
    LangChainPolicy any LangChain chat model
"""

from __future__ import annotations

from selfevolve.errors import UserError
from selfevolve.models import resolve_device, resolve_model_path
from selfevolve.policies.hf import HFPolicy

__all__ = ["HFPolicy", "OpenAIPolicy", "FleetPolicy", "VLLMPolicy", "LangChainPolicy", "load_policy",
           "resolve_model_path", "resolve_device"]

POLICIES = ("hf", "vllm", "openai")


def __getattr__(name):  # lazily: openai, vllm and langchain-core are imported only when used
    if name == "OpenAIPolicy":
        from selfevolve.policies.openai import OpenAIPolicy
        return OpenAIPolicy
    if name == "FleetPolicy":
        from selfevolve.policies.fleet import FleetPolicy
        return FleetPolicy
    if name == "VLLMPolicy":
        from selfevolve.policies.vllm import VLLMPolicy
        return VLLMPolicy
    if name == "LangChainPolicy":
        from selfevolve.policies.langchain import LangChainPolicy
        return LangChainPolicy
    raise AttributeError(name)


def load_policy(model: str, policy: str = "auto", **kwargs):
    """The policy for `model=` and `policy=`: an http(s):// URL is an OpenAI-compatible
    endpoint (`policy=openai`; several, comma-separated, a fleet), anything else a model
    directory or `tiny`, served by transformers (`policy=hf`, the default) or vLLM
    (`policy=vllm`). `kwargs` go to the policy's constructor."""
    if policy == "auto":
        policy = "openai" if model.startswith(("http://", "https://")) else "hf"
    if policy == "openai":
        urls = [u.strip() for u in model.split(",") if u.strip()]
        if len(urls) > 1:
            from selfevolve.policies.fleet import FleetPolicy
            return FleetPolicy(urls, **kwargs)
        from selfevolve.policies.openai import OpenAIPolicy
        kwargs.pop("on_sync_error", None)  # one server: a failed sync always raises
        return OpenAIPolicy(base_url=model, **kwargs)
    if policy == "vllm":
        from selfevolve.policies.vllm import VLLMPolicy
        return VLLMPolicy(model, **kwargs)
    if policy == "hf":
        return HFPolicy(model, **kwargs)
    raise UserError(f"policy={policy}: choose one of {', '.join(POLICIES)}")
