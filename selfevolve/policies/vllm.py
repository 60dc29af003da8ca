"""VLLMPolicy: `vllm.LLM` with LoRA, in a virtualenv that has vLLM (`bench/vllm-env.sh`: vLLM's CPU
build, or CUDA vLLM where there is a GPU).

Written against vLLM's documented offline API: `LLM(model, enable_lora=True, max_lora_rank,
max_loras, seed)`, `LLM.chat(conversations, SamplingParams, lora_request=...)`,
`LLM.generate(prompts, SamplingParams(prompt_logprobs=0), lora_request=...)` and
`vllm.lora.request.LoRARequest(lora_name, lora_int_id, lora_path)`. vLLM caches adapters by
integer id, so every load — a new adapter, or a new version under an old name — gets a
fresh id; reusing an id would serve the cached old weights. The version it replaces is removed.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

from selfevolve.errors import UserError
from selfevolve.types import Conversation, SamplingParams, Turn

MISSING = ("policy=vllm needs vLLM in this virtualenv: `bash bench/vllm-env.sh` makes one with it and selfevolve "
           "(vLLM pins its own transformers; on a GPU machine pip install 'selfevolve[vllm]' also works)")


def vllm_sampling_kwargs(s: SamplingParams, i: int = 0) -> dict:
    """selfevolve SamplingParams -> vllm.SamplingParams keyword arguments for the i-th request
    of a batch. Each request gets its own seed (seed + i): one seed for all would give every
    prompt the same random stream, i.e. correlated samples."""
    kw = dict(n=s.n, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_new_tokens,
              seed=None if s.seed is None else s.seed + i, stop=s.stop)
    if s.logprobs:
        kw["logprobs"] = 0  # the sampled token's log-probability only
    return kw


def turns_from_output(request_output) -> list[Turn]:
    """A vllm RequestOutput -> one Turn per completion (text, token ids, sampled log-probs)."""
    turns = []
    for c in request_output.outputs:
        lps = [step[tok].logprob for tok, step in zip(c.token_ids, c.logprobs)] if c.logprobs else None
        turns.append(Turn(response=c.text.strip(), token_ids=list(c.token_ids), logprobs=lps,
                          finish_reason="length" if c.finish_reason == "length" else "stop"))
    return turns


def prompt_token_logprobs(request_output) -> list[float]:
    """log p(t_i | t_<i) for i ≥ 1 from a RequestOutput generated with prompt_logprobs=0."""
    return [float(entry[tok].logprob) for tok, entry in zip(request_output.prompt_token_ids,
                                                            request_output.prompt_logprobs) if entry is not None]


def check_lora_only(path: str) -> None:
    """vLLM serves LoRA weights; it rejects a peft adapter that also trains embedding rows
    (SELF's `feedback_tokens`) with "trainable_tokens_delta is unsupported LoRA weight"
    (vllm-project/vllm#36501, open). Say so before loading, in words that name the fix."""
    cfg = Path(path) / "adapter_config.json"
    if cfg.is_file() and json.loads(cfg.read_text()).get("trainable_token_indices"):
        raise UserError(f"adapter={path} also trains token embeddings (SELF's feedback_tokens=true), which vLLM "
                        "cannot load yet; serve it with policy=hf, or train with feedback_tokens=false")


class VLLMPolicy:
    def __init__(self, model: str = "tiny", max_lora_rank: int = 64, max_loras: int = 2, seed: int = 0,
                 sampling_from_model: bool = False, **llm_kwargs):
        """`sampling_from_model`: apply the checkpoint's generation_config.json defaults
        (vLLM's generation_config="auto"); off ("vllm"), samples come from π itself."""
        # vLLM's CPU build sizes its KV cache to nearly all free memory unless told, leaving none
        # to the learner beside it (docs/gpu.md). The user's setting wins; CUDA ignores it.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        try:
            from vllm import LLM
        except ImportError:
            raise UserError(MISSING) from None
        from selfevolve.models import resolve_model_path

        self.path = resolve_model_path(model)
        self.llm = LLM(model=str(self.path), enable_lora=True, max_lora_rank=max_lora_rank, max_loras=max_loras,
                       seed=seed, generation_config="auto" if sampling_from_model else "vllm", **llm_kwargs)
        self._ids = itertools.count(1)
        self.requests: dict[str, object] = {}
        self._active: str | None = None

    @property
    def active_adapter(self) -> str | None:
        return self._active

    @property
    def adapters(self) -> dict[str, str]:
        """name -> path of every loaded adapter (what `publish.load_everywhere` rolls back to)."""
        return {n: r.lora_path for n, r in self.requests.items()}

    def _lora(self):
        return self.requests[self._active] if self._active else None

    def load_adapter(self, path: str, name: str) -> None:
        from vllm.lora.request import LoRARequest
        check_lora_only(path)
        replaced = self.requests.get(name)
        self.requests[name] = LoRARequest(name, next(self._ids), str(path))
        self._active = name
        if replaced is not None:  # free the old version's slot now rather than when vLLM's LRU evicts it
            self.llm.llm_engine.remove_lora(replaced.lora_int_id)

    def unload_adapter(self, name: str) -> None:
        req = self.requests.pop(name)
        self.llm.llm_engine.remove_lora(req.lora_int_id)
        if self._active == name:
            self._active = None

    def set_adapter(self, name: str | None) -> None:
        if name is not None and name not in self.requests:
            raise UserError(f"adapter {name!r} is not loaded (loaded: {sorted(self.requests)})")
        self._active = name

    def generate(self, conversations: list[Conversation], sampling: SamplingParams | None = None) -> list[list[Turn]]:
        from vllm import SamplingParams as VSP
        s = sampling or SamplingParams()
        outs = self.llm.chat(conversations, [VSP(**vllm_sampling_kwargs(s, i)) for i in range(len(conversations))],
                             lora_request=self._lora(), use_tqdm=False)
        return [turns_from_output(o) for o in outs]

    def complete(self, texts: list[str], sampling: SamplingParams | None = None) -> list[list[Turn]]:
        from vllm import SamplingParams as VSP
        s = sampling or SamplingParams()
        outs = self.llm.generate(texts, [VSP(**vllm_sampling_kwargs(s, i)) for i in range(len(texts))],
                                 lora_request=self._lora(), use_tqdm=False)
        return [turns_from_output(o) for o in outs]

    def prompt_logprobs(self, text: str) -> list[float]:
        from vllm import SamplingParams as VSP
        out = self.llm.generate([text], VSP(max_tokens=1, temperature=0.0, prompt_logprobs=0),
                                lora_request=self._lora(), use_tqdm=False)[0]
        return prompt_token_logprobs(out)
