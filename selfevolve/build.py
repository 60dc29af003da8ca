"""From words to objects: the one place where names (`policy="tiny"`, `verifier="numeric"`,
`critic="self"`) and a config's keys become a Policy, a Verifier and a Critic.

The loop, the critics and the policies take objects; the CLI, the server, the recipes and
`refine()` come here for them, so every command builds a served policy the same way and
the lower layers never import upwards (docs/architecture.md, "Rooms and layers").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch
from transformers import AutoTokenizer

from selfevolve.data.sources import default_verifier
from selfevolve.errors import UserError
from selfevolve.feedback.critics import get_critic
from selfevolve.loop import refine_batch
from selfevolve.models import resolve_device, resolve_dtype, resolve_model_path
from selfevolve.policies import HFPolicy, load_policy
from selfevolve.training.learner import trainable_model
from selfevolve.turns import StopWhenCorrect, as_turn_policy
from selfevolve.types import Critic, Policy, Task, Trace, TurnPolicy, Verifier
from selfevolve.verifiers import get_verifier


def served_policy(cfg, adapter: str | None = None) -> Policy:
    """The policy a config's `model=`, `policy=`, `device=`, `dtype=` and `batch_size=`
    describe: an http(s):// model is an OpenAI-compatible endpoint, `policy=vllm` a vllm.LLM,
    anything else transformers in process. `adapter` (a peft directory) is loaded and made
    active; so is a recipe's `start_adapter`, verified by its canary."""
    url = cfg.model.startswith(("http://", "https://"))
    if cfg.policy == "hf" and not url:
        kw = {"device": cfg.device, "batch_size": cfg.batch_size, "dtype": cfg.dtype,
              "sampling_from_model": cfg.sampling_from_model}
    elif cfg.policy == "vllm":  # the learner's dtype (`learner_base`), not vLLM's "auto" (the checkpoint's)
        dtype = str(resolve_dtype(cfg.dtype, resolve_device(cfg.device))).removeprefix("torch.")
        kw = {"dtype": dtype, "seed": cfg.seed, "sampling_from_model": cfg.sampling_from_model}
    else:
        kw = {"keep_adapters": cfg.keep_adapters, "on_sync_error": cfg.on_sync_error, "priority": cfg.request_priority}
    policy = load_policy(cfg.model, "auto" if cfg.policy == "hf" else cfg.policy, **kw)
    if adapter:
        policy.load_adapter(adapter, "adapter")
    start = getattr(cfg, "start_adapter", None)
    if start:  # what the run samples from first (an evolve round's served version), verified
        from selfevolve.training.publish import saved_update

        policy = saved_update(start).serve(policy, "start")
    return policy


class LearnerBase(NamedTuple):
    path: Path          # the base weights the adapter is trained on
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype

    def learner(self, cfg, **kw):
        """A trainable model here (`learner.trainable_model`) with the config's LoRA rank and
        alpha and gradient checkpointing; `kw`: lora, init_from, trainable_tokens."""
        return trainable_model(self.path, r=cfg.lora_r, alpha=cfg.lora_alpha, device=self.device, dtype=self.dtype,
                               gradient_checkpointing=cfg.gradient_checkpointing, **kw)


def verifier_for(name: str, tasks: list[Task] | None, workers: int = 1) -> Verifier:
    """The verifier `verifier=` names; `auto` is chosen from the tasks (`sources.default_verifier`),
    and is `math` (math-verify: numbers and expressions) where no tasks are known up front
    (a server's refinement requests)."""
    if name == "auto":
        name = default_verifier(tasks) if tasks is not None else "math"
    return get_verifier(name, workers=workers)


def learner_base(cfg, policy: Policy) -> LearnerBase:
    """The base weights a recipe's learner trains an adapter on, their tokenizer, and where
    the learner lives: the served model's own weights, device and dtype (so the adapter fits
    what serves it, and the canary compares like with like). `base_model=` names the weights
    explicitly; an OpenAI-compatible endpoint offers the path it loaded the model from
    (`root` in /v1/models, as `vllm serve PATH` and `selfevolve serve` report it); for a
    policy in another process the learner goes on `device=` in `dtype=`."""
    where = cfg.base_model or getattr(policy, "path", None) or getattr(policy, "root", None)
    if where is None:
        raise UserError(f"model={cfg.model} does not say where its weights are; pass base_model=PATH (the directory "
                        "the server loaded)")
    path = resolve_model_path(str(where))
    tokenizer = getattr(policy, "tokenizer", None) or AutoTokenizer.from_pretrained(path)
    if isinstance(policy, HFPolicy):
        return LearnerBase(path, tokenizer, policy.device, policy.dtype)
    device = resolve_device(cfg.device)
    return LearnerBase(path, tokenizer, device, resolve_dtype(cfg.dtype, device))


def critic_from_config(cfg, policy, verifier):
    """The critic a config's `critic=`, `judge=`, `critique_prompt=`, `reveal_reference=` and
    `memory=` keys describe (None for critic=none)."""
    judge = load_policy(cfg.judge) if cfg.critic == "judge" and cfg.judge else None
    return get_critic(cfg.critic, policy=policy, verifier=verifier, judge=judge, template=cfg.critique_prompt,
                      reveal_reference=cfg.reveal_reference, memory=cfg.memory, max_new_tokens=cfg.max_new_tokens)


def turn_policy_for(cfg, policy, verifier):
    """What a recipe's config puts between attempts: its critic, else its own second-turn
    instruction (SCoRe's `instruction=`), else SCoRe's default instruction (None)."""
    critic = critic_from_config(cfg, policy, verifier)
    if critic is None and getattr(cfg, "instruction", None):
        from selfevolve.turns import Instruction

        return Instruction(cfg.instruction)
    return critic


def refine(prompt_or_task: Task | str | list, policy: Policy | str = "tiny", verifier: Verifier | str | None = None,
           critic: Critic | TurnPolicy | str | None = None, max_turns: int = 3, stop_when_correct: bool = True,
           **kwargs) -> Trace | list[Trace]:
    """Self-refine one prompt/Task (returns its Trace) or a list (returns a list, batched).
    The answer is `trace.final`; the whole episode, with every critique and score, is
    `trace.turns`. `critic` is a Critic, a TurnPolicy (selfevolve/turns.py: e.g.
    `Reflexion(critic, window=1)`) or None (SCoRe's instruction); with a verifier an attempt
    it scores 1 ends the episode unless `stop_when_correct=False` (oracle stopping, not for
    evaluation). `policy`, `verifier` and `critic` may be given by name:

    >>> trace = refine("What is 7 + 8 - 3?", policy="tiny", verifier="numeric", critic="verifier")  # doctest: +SKIP
    >>> trace.final, [t.score for t in trace.turns]                                               # doctest: +SKIP
    """
    policy = load_policy(policy) if isinstance(policy, str) else policy
    verifier = get_verifier(verifier) if isinstance(verifier, str) else verifier
    critic = get_critic(critic, policy=policy, verifier=verifier) if isinstance(critic, str) else critic
    turns = as_turn_policy(critic)
    if stop_when_correct and verifier is not None:
        turns = StopWhenCorrect(turns)
    many = isinstance(prompt_or_task, list)
    traces = refine_batch(prompt_or_task if many else [prompt_or_task], policy, verifier, turns, max_turns, **kwargs)
    return traces if many else traces[0]
