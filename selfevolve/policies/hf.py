"""HFPolicy: transformers + peft in process. The CPU default and the reference policy.

Generation is batched across conversations (left padding, KV cache via `model.generate`),
prompts are sorted by length so a batch pads little, and results come back in input order.
Several LoRA adapters can be loaded at once and switched by name; `active_adapter=None`
is the base model. The same `model` object is what a recipe trains, so a single machine
serves the adapter it just trained without a copy.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import re
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
from peft import PeftConfig, PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import load_peft_weights
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from selfevolve.errors import UserError
from selfevolve.models import release_freed_memory, resolve_device, resolve_dtype, resolve_model_path
from selfevolve.progress import progress
from selfevolve.training.learner import encode_chat, pad_batch, text_token_logprobs, token_logprobs
from selfevolve.types import Conversation, SamplingParams, Turn, cut_at_stop


class _MaskedAlready(logging.Filter):
    """transformers warns "We strongly recommend passing in an `attention_mask`" from inside
    generate(): rows that finished are padded while others decode, and its decode steps look
    for pad tokens without the mask we passed. Nothing a user can act on; only this message
    is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "strongly recommend passing in an `attention_mask`" not in record.getMessage()


logging.getLogger("transformers.modeling_utils").addFilter(_MaskedAlready())


class ChosenLogprobs(LogitsProcessor):
    """Records log π(chosen token) at every generation step while holding one step's B×V
    log-softmax, not `output_logits`' B×T×V (0.8 GB in fp32 for 64 rows × 64 tokens of a 49k
    vocabulary). generate() runs custom processors before its temperature/top-p warpers, so
    the scores are π's own: the same values `output_logits` gave (tests/test_policy_hf.py).
    Step t's chosen token is seen at step t+1 (the last column of `input_ids`); `finish`
    takes the last one from the returned sequences."""

    def __init__(self, top: int = 0):
        self.top = top  # also the `top` most likely tokens at each step
        self.steps: list[torch.Tensor] = []
        self.tops: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._last: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self._last is not None:
            self.steps.append(self._last.gather(1, input_ids[:, -1:]).squeeze(1))
        self._last = torch.log_softmax(scores.float(), -1)
        if self.top:
            self.tops.append(self._last.topk(self.top, -1))
        return scores

    def finish(self, new_tokens: torch.Tensor) -> list[list[float]]:
        """(B, T) log-probs of the generated tokens `new_tokens`."""
        if self._last is not None:
            self.steps.append(self._last.gather(1, new_tokens[:, -1:].to(self._last.device)).squeeze(1))
        return torch.stack(self.steps, 1).tolist() if self.steps else [[] for _ in range(len(new_tokens))]

    def top_tokens(self) -> list[list[dict[int, float]]]:
        """(B, T): each step's `top` tokens with their log-probs, row by row."""
        steps = [[dict(zip(i.tolist(), v.tolist())) for v, i in zip(values, indices)] for values, indices in self.tops]
        return [list(row) for row in zip(*steps)]


class TokenStream(StoppingCriteria):
    """Streams generation: after every decoding step, `emit[r](token)` for each row r with a
    callback, with the token it just sampled, until an end token ends the row. Never stops
    generation itself."""

    def __init__(self, emit: list, eos: set[int]):
        self.emit, self.eos, self.done = emit, eos, [e is None for e in emit]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        for r, token in enumerate(input_ids[:, -1].tolist()):
            if not self.done[r]:
                self.emit[r](token)
                self.done[r] = token in self.eos
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class SeededSampling(LogitsProcessor):
    """Draws each row's next token from that row's own generator (temperature, then top-p,
    as generate()'s warpers would), so what a row samples depends on its seed alone, not on
    the rows batched with it; returns scores under which the drawn token is the only choice
    (greedy decoding then takes it). Runs after ChosenLogprobs, which records π's own
    log-probs."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float):
        self.generators = [torch.Generator().manual_seed(s % 2**63) for s in seeds]
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(scores.float() / self.temperature, -1)
        if self.top_p < 1.0:  # the smallest set of most likely tokens whose mass reaches top_p
            ranked, order = probs.sort(-1, descending=True)
            probs = torch.zeros_like(probs).scatter(-1, order, ranked * (ranked.cumsum(-1) - ranked < self.top_p))
        u = torch.stack([torch.rand((), generator=g) for g in self.generators]).to(probs.device)
        cdf = probs.cumsum(-1)  # the first token whose cumulative mass exceeds u: never one of probability 0
        chosen = torch.searchsorted(cdf, (u[:, None] * cdf[:, -1:]).contiguous(), right=True)[:, 0]
        chosen = chosen.clamp(max=probs.shape[-1] - 1)
        return torch.full_like(scores, float("-inf")).scatter(1, chosen[:, None], 0.0)


def row_seeds(seeds: list[int | None], n: int) -> list[int]:
    """One seed per generated row (prompt i's j-th sample): from the prompt's seed and j, or
    drawn from torch's global generator for a prompt without one."""
    return [(s * 65_537 + j) if s is not None else int(torch.randint(2**62, ())) for s in seeds for j in range(n)]


class HFPolicy:
    """A local Hugging Face causal LM as a Policy.

    >>> p = HFPolicy("tiny")                                          # doctest: +SKIP
    >>> p.generate([[{"role": "user", "content": "What is 12 + 30?"}]], SamplingParams())  # doctest: +SKIP
    """

    def __init__(self, model="tiny", device: str = "auto", batch_size: int = 64,
                 dtype: str | torch.dtype = "auto", tokenizer=None, sampling_from_model: bool = False):
        """`model` is `tiny`, a local model directory, or an in-memory PreTrainedModel (then
        pass its `tokenizer`): a recipe serves the very model object it trains.
        `sampling_from_model`: also apply the checkpoint's own generation defaults
        (repetition_penalty, top_k, ...); off, temperature 1 samples from π itself."""
        self.batch_size = batch_size
        if not isinstance(model, (str, Path)):
            self.path = Path(getattr(model, "name_or_path", "") or "in-memory")
            self.model, self.tokenizer = model, tokenizer
            self.device = next(model.parameters()).device
        else:
            self.device = resolve_device(device)
            self.path = resolve_model_path(str(model))
            if isinstance(dtype, str):
                dtype = resolve_dtype(dtype, self.device)
            try:
                self.tokenizer = AutoTokenizer.from_pretrained(self.path)
                self.model = AutoModelForCausalLM.from_pretrained(self.path, dtype=dtype).to(self.device)
                release_freed_memory(self.model, self.device)
            except (OSError, ValueError) as e:
                raise UserError(f"model={model}: cannot load ({str(e).splitlines()[0]})") from None
        if self.tokenizer.chat_template is None:
            raise UserError(f"model={model}: the tokenizer has no chat template")
        self.model.eval()
        self.pad_id = (
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        )
        eos = self.model.generation_config.eos_token_id or self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.max_positions = getattr(self.model.config, "max_position_embeddings", None) or getattr(self.model.config,
                                                                                                    "n_positions", 4096)
        self.adapters: dict[str, str] = {}
        self._peft: dict[str, str] = {}  # name -> the adapter's name inside peft (each load a new one)
        self._versions = itertools.count(1)
        self._active: str | None = None
        if not sampling_from_model:  # sample from π itself: none of the checkpoint's sampling defaults
            gc = self.model.generation_config  # (transformers fills unset generate() arguments from it)
            self.model.generation_config = GenerationConfig(bos_token_id=gc.bos_token_id, eos_token_id=gc.eos_token_id,
                                                            pad_token_id=gc.pad_token_id)

    def reloaded(self, path: str | Path) -> HFPolicy:
        """The same engine (device, batch size) over other full weights: how a run that
        trains all weights (lora=false) serves its update."""
        return HFPolicy(str(path), device=str(self.device), batch_size=self.batch_size)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    # --- adapters ----------------------------------------------------------------------

    @property
    def active_adapter(self) -> str | None:
        return self._active

    def load_adapter(self, path: str, name: str) -> None:
        """Load a peft LoRA adapter from `path` under `name` and make it active. Loading an
        existing name replaces that adapter whole — its config (rank, alpha, target modules)
        and every tensor come from the new files, nothing from the old version — by loading
        it beside the old one and switching the name over, then deleting the old: callers
        see the old version or the new, never a mix and never no adapter.

        All or nothing: an adapter that does not load (unreadable weights, another base model)
        leaves the model exactly as it was — the served model, its loaded adapters and its
        modules — because a half-applied update is the silent sync failure `publish` exists to
        catch, and a server keeps serving others after a bad request."""
        p = Path(path)
        if not (p / "adapter_config.json").is_file():
            raise UserError(f"adapter={path}: not a peft adapter directory (no adapter_config.json)")
        try:  # a config peft cannot use fails here, before the model is touched
            config = json.loads((p / "adapter_config.json").read_text())
            if not isinstance(config, dict) or not isinstance(config.get("r", 8), int):
                raise ValueError("expected an object with an integer r")
            PeftConfig.from_pretrained(str(p))
        except Exception as e:
            raise UserError(f"adapter={path}: adapter_config.json is not a usable peft config "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})") from None
        try:  # unreadable or truncated weights fail here, before the model is touched
            weights = load_peft_weights(str(p), device=str(self.device))
        except Exception as e:
            raise UserError(f"adapter={path}: cannot read its weights ({type(e).__name__})") from None
        bad = next((k for k, v in weights.items() if v.is_floating_point() and not bool(v.isfinite().all())), None)
        if bad is not None:  # it would load, then answer 500 when sampled and '' greedy
            raise UserError(f"adapter={path}: weight {bad} is not finite (NaN or inf); not loaded")
        internal = f"v{next(self._versions)}"  # peft's own name: any `name` works (dots too), and a new version is new
        try:
            if not isinstance(self.model, PeftModel):
                self.model = PeftModel.from_pretrained(self.model, str(p), adapter_name=internal).to(self.device)
            else:
                self.model.load_adapter(str(p), adapter_name=internal)
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            self._undo_load(internal)
            try:
                base = json.loads((p / "adapter_config.json").read_text()).get("base_model_name_or_path")
            except (ValueError, AttributeError):
                base = None
            shapes = re.search(
                r"shape torch.Size\((\[[\d, ]*\])\) from checkpoint, the shape in current model is "
                r"torch.Size\((\[[\d, ]*\])\)",
                str(e),
            )
            if not shapes:
                raise UserError(f"adapter={path}: not a usable peft adapter ({str(e).splitlines()[0][:160]})") from None
            raise UserError(
                f"adapter={path} does not fit this model: it was trained for another base model"
                f"{f' ({base})' if base else ''}: weights of shape {shapes[1]} where this model has {shapes[2]}"
            ) from None
        self.model.eval()
        old = self._peft.get(name)
        self._peft[name], self.adapters[name] = internal, str(p)
        self.set_adapter(name)
        if old is not None:
            self.model.delete_adapter(old)
            self.model.set_adapter(internal)

    def _undo_load(self, internal: str) -> None:
        """Put the model back as it was before a failed load of peft adapter `internal`: no
        trace of it (peft injects its layers before it loads the weights, so a failed first
        load leaves LoRA layers in the base model)."""
        if isinstance(self.model, PeftModel):
            if internal in self.model.peft_config:
                self.model.delete_adapter(internal)
            if self._active is not None:
                self.model.set_adapter(self._peft[self._active])
        else:
            for path, module in list(self.model.named_modules()):
                if isinstance(module, BaseTunerLayer):
                    parent, _, child = path.rpartition(".")
                    setattr(self.model.get_submodule(parent), child, module.get_base_layer())
            if hasattr(self.model, "peft_config"):
                del self.model.peft_config

    def unload_adapter(self, name: str) -> None:
        """Remove a loaded adapter; the base model serves if it was active."""
        if name not in self.adapters:
            raise UserError(f"adapter {name!r} is not loaded (loaded: {sorted(self.adapters)})")
        if self._active == name:
            self.set_adapter(None)
        if len(self.adapters) == 1:  # peft cannot delete its last adapter: drop the wrapper
            self.model = self.model.unload()
        else:
            self.model.delete_adapter(self._peft[name])
            if self._active is not None:
                self.model.set_adapter(self._peft[self._active])
        del self.adapters[name], self._peft[name]

    def set_adapter(self, name: str | None) -> None:
        """Switch to a loaded adapter by name, or to the base model with None."""
        if name is not None:
            if name not in self.adapters:
                raise UserError(f"adapter {name!r} is not loaded (loaded: {sorted(self.adapters)})")
            self.model.set_adapter(self._peft[name])
        self._active = name

    def _adapter_context(self):

        if self._active is None and hasattr(self.model, "disable_adapter"):
            return self.model.disable_adapter()
        return nullcontext()

    # --- generation --------------------------------------------------------------------

    def encode_prompts(self, conversations: list[Conversation]) -> list[list[int]]:
        """Render every chat template, then tokenize all prompts in one batched call."""
        texts = [self.tokenizer.apply_chat_template(c, tokenize=False,
                                                    add_generation_prompt=True) for c in conversations]
        return [list(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []

    def generate(self, conversations: list[Conversation], sampling: SamplingParams | None = None,
                 seeds: list[int | None] | None = None, on_token: list | None = None) -> list[list[Turn]]:
        """`sampling.n` Turns per conversation, in input order. Conversation i is sampled
        with its own seed, `seeds[i]` when given, else `sampling.seed + i` (as vLLM seeds each
        request): the same conversation and seed give the same output in any batch.
        `on_token[i]`, where given, is called as `(sample, token_id)` with each token of
        conversation i as it is generated (streaming), the end token included."""
        return self.generate_ids(self.encode_prompts(conversations), sampling, seeds, on_token)

    def complete(self, prompts: list[str | list[int]], sampling: SamplingParams | None = None,
                 seeds: list[int | None] | None = None, on_token: list | None = None) -> list[list[Turn]]:
        """Continue raw texts, or token ids (no chat template): what `/v1/completions` serves."""
        ids = [p if isinstance(p, list) else self.tokenizer(p)["input_ids"] for p in prompts]
        return self.generate_ids([list(x) for x in ids], sampling, seeds, on_token)

    @torch.no_grad()
    def generate_ids(self, prompts: list[list[int]], sampling: SamplingParams | None = None,
                     seeds: list[int | None] | None = None, on_token: list | None = None) -> list[list[Turn]]:
        sampling = sampling or SamplingParams()
        if sampling.temperature == 0 and sampling.n > 1:  # greedy: n equal answers (as OpenAI returns them)
            once = self.generate_ids(prompts, sampling.model_copy(update={"n": 1}), on_token=on_token)
            return [[t.model_copy(deep=True) for _ in range(sampling.n) for t in turns] for turns in once]
        if seeds is None and sampling.seed is not None:
            seeds = [sampling.seed + i for i in range(len(prompts))]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out: list[list[Turn]] = [[] for _ in prompts]
        starts = range(0, len(order), self.batch_size)
        with self._adapter_context(), progress("generate", total=len(starts) if len(starts) > 1 else None) as bar:
            for start in starts:
                idx = order[start : start + self.batch_size]
                batch_seeds = [seeds[i] for i in idx] if seeds is not None else None
                emit = [on_token[i] for i in idx] if on_token is not None else None
                for i, turns in zip(idx, self._generate_batch([prompts[i] for i in idx], sampling, batch_seeds, emit)):
                    out[i] = turns
                bar.advance()
        return out

    def _fit(self, prompt: list[int], sampling: SamplingParams) -> list[int]:
        """A prompt longer than the context allows (keeping room for some of the answer) is
        cut from the left, with a warning: one long conversation must not stop a batch or
        a run. Requests that must not be cut are checked before (the server does)."""
        room = self.max_positions - min(sampling.max_new_tokens, max(1, self.max_positions // 4))
        if len(prompt) <= room:
            return prompt
        warnings.warn(
            f"a prompt of {len(prompt)} tokens was cut to its last {room} (model context {self.max_positions})"
        )
        return prompt[-room:]

    def _generate_batch(self, prompts: list[list[int]], sampling: SamplingParams,
                        seeds: list[int | None] | None = None, emit: list | None = None) -> list[list[Turn]]:
        prompts = [self._fit(p, sampling) for p in prompts]
        seeded = sampling.temperature > 0 and seeds is not None
        if seeded:  # greedy over each row's own draw: the n rows of a prompt are laid out here, not by generate()
            prompts = [p for p in prompts for _ in range(sampling.n)]
        width = max(len(p) for p in prompts)
        budget = min(sampling.max_new_tokens, self.max_positions - width)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, p in enumerate(prompts):
            ids[r, width - len(p) :] = torch.tensor(p)
            mask[r, width - len(p) :] = 1
        chosen = ChosenLogprobs(sampling.top_logprobs) if sampling.logprobs or sampling.top_logprobs else None
        processors = [chosen] if chosen else []
        if seeded:
            processors.append(SeededSampling(row_seeds(seeds, sampling.n), sampling.temperature, sampling.top_p))
        kwargs = dict(max_new_tokens=budget, num_return_sequences=1 if seeded else sampling.n, pad_token_id=self.pad_id,
                      eos_token_id=sorted(self.eos_ids), return_dict_in_generate=True,
                      logits_processor=LogitsProcessorList(processors) if processors else None)
        if emit is not None and any(emit):  # row r is sample r % n of prompt r // n, in both layouts
            rows = [None if emit[r // sampling.n] is None else functools.partial(emit[r // sampling.n], r % sampling.n)
                    for r in range(len(prompts) * (1 if seeded else sampling.n))]
            kwargs["stopping_criteria"] = StoppingCriteriaList([TokenStream(rows, self.eos_ids)])
        if sampling.temperature > 0 and not seeded:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        res = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **kwargs)
        new = res.sequences[:, width:].tolist()
        lps = chosen.finish(res.sequences[:, width:]) if chosen else None
        tops = chosen.top_tokens() if chosen and chosen.top else None
        cuts = [next((k for k, t in enumerate(toks) if t in self.eos_ids), len(toks)) for toks in new]
        texts = self.tokenizer.batch_decode([toks[:cut] for toks, cut in zip(new, cuts)], skip_special_tokens=True)
        turns: list[list[Turn]] = []
        for r, (toks, cut, text) in enumerate(zip(new, cuts, texts)):
            end = cut + 1 if cut < len(toks) else cut  # the stop token is a sampled token: kept, as vLLM keeps it
            turn = cut_at_stop(Turn(response=text.strip(), token_ids=toks[:end], logprobs=lps[r][:end] if lps else None,
                                    top_logprobs=tops[r][:end] if tops else None,
                                    finish_reason="stop" if cut < len(toks) else "length"), sampling.stop)
            if r % sampling.n == 0:
                turns.append([])
            turns[-1].append(turn)
        return turns

    # --- scoring -----------------------------------------------------------------------

    @torch.no_grad()
    def logprobs(self, conversations: list[Conversation]) -> list[float]:
        """Summed log-probability of each conversation's last assistant message under the
        active adapter."""
        rows = [encode_chat(self.tokenizer, c, train_on="last") for c in conversations]
        with self._adapter_context():
            lp, _ = token_logprobs(self.model, pad_batch(rows, self.pad_id, self.device))
        return lp.sum(-1).tolist()

    def prompt_token_logprobs(self, prompt: str | list[int], top: int = 0) \
            -> tuple[list[int], list[float | None], list[dict[int, float] | None]]:
        """Token ids of `prompt` (a text, or token ids), log p(t_i | t_<i) for each (None for
        the first) and the `top` most likely tokens at each position, under the active
        adapter: what `/v1/completions` with echo=true and logprobs returns."""
        with self._adapter_context():
            return text_token_logprobs(self.model, self.tokenizer, prompt, top)

    def prompt_logprobs(self, text: str) -> list[float]:
        """log p(t_i | t_<i) for every token of `text` after the first (verified sync's canary)."""
        return [float(lp) for lp in self.prompt_token_logprobs(text)[1][1:]]
