"""Sync: how an update reaches the served policy, and the proof that it did
(docs/architecture.md, "A recipe step").

A recipe trains a model (the learner), then `publish`es it: the adapter is saved to
`run_dir/adapters/NAME`, loaded into the policy that serves rollouts (HFPolicy in process,
vLLM as a new LoRARequest, an OpenAI-compatible server via /v1/load_lora_adapter), and
verified. Verification is two checks, because a silent sync failure (the old adapter still
active, a half-written file, a server that ignored the request) makes every later round
train on the wrong model's samples:

  1. the policy reports the new adapter id as active;
  2. a canary: the per-token log-probabilities of a fixed text (every token after the first,
     what an OpenAI-compatible `/v1/completions` call with `echo=true, logprobs` returns)
     under the served policy agree with the learner's within the tolerance of the dtype
     (maximum and mean absolute error per token, `CANARY_TOL`), and are not closer, by more
     than the noise (half the mean tolerance), to what was served before the load or to the
     base model than to the new version: a server that kept the old weights, or serves the
     base model, is caught and named even in bf16. The text is
     followed by the words of any embedding rows the adapter trains, so those rows are
     checked too. Anything else, a non-finite value included, raises `SyncError`.

Only then is the adapter it replaces unloaded (`replaces=`): a failed publish leaves the
previous adapter serving. Deleting old adapter directories is the run's business
(`Run.retire`), after a checkpoint that no longer refers to them is durable.
"""

from __future__ import annotations

import errno
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from . import distributed
from .errors import SyncError, UserError, WriteFailed, disk_full
from .losses import behaviour_logprobs, truncated_is_weights
from .policies.replicas import load_everywhere
from .training import text_token_logprobs
from .types import AdapterServing

# A fixed, short text every model can score; its content does not matter.
CANARY = "What is 2 + 3? 2 + 3 = 5. The answer is 5."


def canary_logprobs(model, tokenizer, text: str = CANARY) -> list[float]:
    """log p(t_i | t_<i) for every token of `text` after the first, under `model` as it is
    (a peft model: with its adapter)."""
    return [float(lp) for lp in text_token_logprobs(model, tokenizer, text)[1][1:]]


def text_logprob(model, tokenizer, text: str = CANARY) -> float:
    """Σ_{i≥1} log p(t_i | t_<i) over the tokens of `text`."""
    return sum(canary_logprobs(model, tokenizer, text))


def trained_token_ids(model) -> list[int]:
    """Token ids whose embedding rows a peft adapter trains (`trainable_tokens`), else []."""
    cfg = getattr(model, "peft_config", {}).get("default")
    ids = getattr(cfg, "trainable_token_indices", None) or []
    return sorted({i for v in ids.values() for i in v} if isinstance(ids, dict) else set(ids))


def canary_for(model, tokenizer) -> str:
    """The canary, followed by the tokens of any embedding rows the adapter trains: those
    rows must reach the served model too, and a text without them would not notice."""
    ids = trained_token_ids(model)
    return CANARY + (" " + tokenizer.decode(ids) if ids else "")


# Canary tolerance per token, (maximum, mean) absolute error in nats, by the learner's dtype:
# the learner runs in the served model's dtype (build.learner_base), so what is left is kernel
# and summation-order noise between two implementations of the same weights in that dtype,
# about half the tolerance (transformers vs vLLM's CPU kernels, BENCHMARKS.md "Verified sync";
# fp16 is set between the two, not measured).
CANARY_TOL = {torch.float32: (2e-3, 5e-4), torch.float16: (0.1, 0.02), torch.bfloat16: (0.3, 0.04)}


def canary_tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """The (maximum, mean) absolute per-token canary tolerance for weights in `dtype`.

    >>> canary_tolerance(torch.float32), canary_tolerance(torch.bfloat16)
    ((0.002, 0.0005), (0.3, 0.04))
    """
    return CANARY_TOL.get(dtype, CANARY_TOL[torch.float32])


def canary_gap(served: list[float], expected: list[float]) -> tuple[float, float]:
    """(maximum, mean) absolute difference per token between two canary scorings.

    >>> canary_gap([-1.0, -2.0, -0.5], [-1.0, -2.5, -0.4])
    (0.5, 0.2)
    """
    if len(served) != len(expected) or not expected:
        raise SyncError(f"the canary has {len(served)} token log-probs served and {len(expected)} from the learner: "
                        "another tokenizer?")
    d = [abs(a - b) for a, b in zip(served, expected)]
    return round(max(d), 12), round(sum(d) / len(d), 12)


def verify_sync(policy: AdapterServing, name: str | None, expected: list[float],
                tol: tuple[float, float] = CANARY_TOL[torch.float32], text: str = CANARY,
                others: dict[str, list[float] | None] | None = None) -> list[float]:
    """Raise SyncError unless `policy` serves adapter `name` and scores the canary `text` per
    token as the learner did (`expected`): no closer to any of `others` (label -> per-token
    log-probs of a version it must not be: the one it replaces, the base model) than to
    `expected` by more than the noise between implementations (half the mean tolerance), and
    within `tol` = (maximum, mean) absolute error of `expected`. The first check names the
    version a wrong server serves; a zero update passes it (the served values then sit as close
    to the old version as to the new). A non-finite value on either side is an error too (a
    NaN would otherwise pass every comparison). Returns the served log-probs."""
    if policy.active_adapter != name:
        raise SyncError(f"policy reports adapter {policy.active_adapter!r} after loading {name!r}")
    served = [float(x) for x in policy.prompt_logprobs(text)]
    if not all(math.isfinite(x) for x in served + list(expected)):
        raise SyncError(f"canary log-prob is not finite: learner {sum(expected)}, served {sum(served)} "
                        f"(adapter {name!r})")
    worst, mean = canary_gap(served, expected)
    gaps = [(canary_gap(served, other)[1], label) for label, other in (others or {}).items() if other is not None]
    nearer = sorted(g for g in gaps if g[0] + tol[1] / 2 < mean)
    if nearer:
        raise SyncError(f"the server scores the canary as {nearer[0][1]} ({nearer[0][0]:.5f} nats per token away) "
                        f"rather than as the update ({mean:.5f}): adapter {name!r} did not take effect")
    if worst > tol[0] or mean > tol[1]:
        raise SyncError(f"canary log-probs differ from the learner's: max {worst:.5f}, mean {mean:.5f} nats per token "
                        f"(adapter {name!r}, tolerance {tol[0]:g}/{tol[1]:g})")
    return served


def sampled_logprob_ratio(logp: torch.Tensor, values: torch.Tensor, where: torch.Tensor) -> tuple[float, float, int]:
    """The continuous sync check on the sampled tokens whose log-probability the server
    reported (`values` at `where`, placed by `losses.behaviour_logprobs`): Σ r and
    Σ (r − 1 − log r) with r = π_learner / π_served, and how many tokens.

    The mean of r is about 1.0 when learner and server agree — but also, in expectation,
    when they do not (E_{y~π_served}[π_learner(y)/π_served(y)] = Σ π_learner = 1), so it
    shows a mismatch only through its noise. The mean of r − 1 − log r estimates
    KL(π_served ‖ π_learner) (Schulman's k3): ≥ 0, zero only when they agree; that is the
    number to alarm on. It catches on every step's real samples what the canary catches at
    sync time: a server that samples from another model than the learner's.

    >>> lp = torch.log(torch.tensor([[0.5, 0.25, 0.1]], dtype=torch.float64))
    >>> sampled_logprob_ratio(lp, lp.clone(), torch.tensor([[True, True, False]]))
    (2.0, 0.0, 2)
    >>> [round(x, 4) for x in sampled_logprob_ratio(lp, lp / 2, torch.tensor([[True, False, False]]))]
    [0.7071, 0.0537, 1]
    """
    d = (logp.detach().double().cpu() - values)[where]
    return float(d.exp().sum()), float((d.exp() - 1 - d).sum()), int(where.sum())


class SampledCheck:
    """What the sampler reported for the tokens a step trains on, over its micro-batches:
    `served[e]` is row-episode e's (y1, y2) as (tokens, log-probs) (None: not asked).
    `weights` places them on a micro-batch's rows (`losses.behaviour_logprobs`; `decode`
    compares tokens reported as text) and returns each attempt's importance weights when
    `is_cap` is set (an older adapter sampled the batch: `losses.truncated_is_weights`),
    else None; `parts` gives the log's `logprob_ratio`, `logprob_kl` (the learner/server
    check, `sampled_logprob_ratio`), `is_weight` (the mean weight) and `unmatched_rows`
    (attempts whose tokens differ from the trained ones, left unweighted)."""

    def __init__(self, served: list[tuple] | None, decode=None, is_cap: float | None = None):
        self.served, self.decode, self.is_cap = served, decode, is_cap
        self.sums = [0.0, 0.0, 0, 0, 0.0, 0]  # Σ ratio, Σ k3, tokens, unmatched, Σ weight, weighted tokens

    def weights(self, logp: torch.Tensor, target: torch.Tensor, masks: tuple, episodes: list[int]) -> tuple:
        if self.served is None:
            return (None,) * len(masks)
        out = []
        for k, mask in enumerate(masks):
            values, where, unmatched = behaviour_logprobs(target, mask, [self.served[e][k] for e in episodes],
                                                          self.decode)
            w = truncated_is_weights(logp, values, where, self.is_cap) if self.is_cap else None
            seen = (float((w * mask).sum()), int(mask.sum())) if w is not None else (0.0, 0)
            for i, v in enumerate((*sampled_logprob_ratio(logp, values, where), unmatched, *seen)):
                self.sums[i] += v
            out.append(w)
        return tuple(out)

    def parts(self, total: bool = False) -> dict:
        """The log's fields; with `total`, summed over the ranks first."""
        ratio, kl, n, unmatched, w, wn = (distributed.total(x) for x in self.sums) if total else self.sums
        out = {"is_weight": round(w / wn, 5)} if wn else {}
        if n:
            out |= {"logprob_ratio": round(ratio / n, 5), "logprob_kl": round(kl / n, 6)}
        return out | ({"unmatched_rows": int(unmatched)} if self.served is not None else {})


def server_mismatch(parts: dict, tol: float) -> str | None:
    """The learner scores the tokens the server sampled, with the weights the server was sent:
    a KL between them above `tol` means the server samples from another model (an adapter
    that never arrived, a stale version, a different dtype or template)."""
    if parts.get("logprob_kl", 0.0) > tol:
        return (f"KL(server ‖ learner) on the sampled tokens is {parts['logprob_kl']:.4f} (ratio "
                f"{parts['logprob_ratio']:.3f}): the server samples from another model?")
    return None


def serve_update(policy: AdapterServing, path: str | Path, name: str, lora: bool = True,
                 check=None) -> AdapterServing:
    """Load a saved update into the serving side (on every replica, `load_everywhere`, each
    checked by `check`) and return the policy that serves it: the same object for an
    adapter (under `name`), a new policy for full weights (`HFPolicy.reloaded`). `publish` uses it after saving;
    a resumed run uses it to serve its last update again."""
    if lora:
        load_everywhere(policy, path, name, check)
        return policy
    reloaded = getattr(policy, "reloaded", None)  # HFPolicy's: the same engine settings, other weights
    if reloaded is None:
        raise UserError(
            f"lora=false trains all weights, which only policy=hf can reload; {type(policy).__name__} "
            "serves LoRA adapters (keep lora=true)"
        )
    served = reloaded(path)
    if check is not None:
        check(served)
    return served


@dataclass(frozen=True)
class SavedUpdate:
    """A saved update and the canary scores the served policy must reproduce: the learner's
    half of `publish`, made by `save_update` where the learner lives (it writes, and under
    torchrun waits for rank 0). `serve` is the serving half, which may run on the thread that
    drives the served policy (`ServingThread`), so an update can be loaded between two
    rollouts while the learner goes on."""

    path: Path
    lora: bool
    canary: str
    expected: list[float]         # the learner's per-token log-probs of `canary`
    tol: tuple[float, float]      # (maximum, mean) absolute error per token
    base: list[float] | None      # the same under the base weights (adapter off); None for full weights

    def verify(self, policy: AdapterServing, name: str | None, previous: list[float] | None = None) -> list[float]:
        """`verify_sync` of this update on `policy` (serving it under `name`), which must not be
        nearer `previous` (what was served before) or the base model than this update."""
        return verify_sync(policy, name, self.expected, self.tol, self.canary,
                           {"the version it replaces": previous, "the base model": self.base})

    def serve(self, policy: AdapterServing, name: str, replaces: str | None = None) -> AdapterServing:
        """Serve the update under `name` on every replica, verify each (against what the policy
        served before the load too), then unload the adapter it `replaces` (if any); return the
        policy that now serves it."""
        previous = [float(x) for x in policy.prompt_logprobs(self.canary)]
        served = serve_update(policy, self.path, name, self.lora,
                              check=lambda replica: self.verify(replica, name if self.lora else None, previous))
        if self.lora and replaces is not None and replaces != name and replaces in served.adapters:
            served.unload_adapter(replaces)
        return served


CANARY_FILE = "canary.json"  # beside the weights: what the learner scored, for every later load


def save_update(model, tokenizer, path: str | Path, lora: bool = True,
                tol: tuple[float, float] | None = None) -> SavedUpdate:
    """Save the learner to `path` (rank 0 writes; every rank waits for the file) and score the
    canary with it, and with its adapter off (`tol`: default the learner's dtype's
    `canary_tolerance`). The canary's text, scores and tolerance are saved with the weights
    (`canary.json`), so a load long after the learner is gone — a resumed run's, a final
    selection's — is verified the same way (`saved_update`)."""
    path = Path(path)
    canary = canary_for(model, tokenizer)
    tol = canary_tolerance(model.dtype) if tol is None else tuple(tol)
    base = None
    if lora:
        with model.disable_adapter():
            base = canary_logprobs(model, tokenizer, canary)
    update = SavedUpdate(path, lora, canary, canary_logprobs(model, tokenizer, canary), tol, base)
    if distributed.is_main():  # under torchrun the ranks hold the same weights; one writes them
        tmp = path.with_name(path.name + ".tmp")  # whole or not at all: a full disk leaves the old files
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            model.save_pretrained(tmp)
            if not lora:
                tokenizer.save_pretrained(tmp)
            (tmp / CANARY_FILE).write_text(json.dumps({"text": canary, "logprobs": update.expected, "tol": list(tol),
                                                       "base": base}))
        except Exception as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if disk_full(e):
                raise WriteFailed(errno.ENOSPC, f"{type(e).__name__}: {str(e)[:120]}", str(path)) from None
            raise
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    distributed.barrier()  # then every rank loads the file into its own engine and checks it
    return update


def saved_update(path: str | Path, lora: bool = True) -> SavedUpdate:
    """The SavedUpdate `save_update` wrote to `path`, read back: `.serve(policy, name)` loads
    it and verifies the canary as the publish did. An update without its canary cannot be
    verified and is refused (SyncError), never served unchecked."""
    path = Path(path)
    try:
        c = json.loads((path / CANARY_FILE).read_text())
        if "logprob" in c and "logprobs" not in c:
            raise SyncError(f"adapter={path}: its {CANARY_FILE} holds one summed log-prob (written before the "
                            "per-token canary), so its load cannot be verified; train or save it again")
        base = None if c.get("base") is None else [float(x) for x in c["base"]]
        return SavedUpdate(path, lora, str(c["text"]), [float(x) for x in c["logprobs"]],
                           (float(c["tol"][0]), float(c["tol"][1])), base)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise SyncError(f"adapter={path}: no readable {CANARY_FILE} ({type(e).__name__}), so its load cannot be "
                        "verified; it was not saved by save_update") from None


def publish(policy: AdapterServing, model, tokenizer, path: str | Path, name: str, lora: bool = True,
            tol: tuple[float, float] | None = None, replaces: str | None = None) -> AdapterServing:
    """Save the learner to `path`, serve it under `name` on every replica, verify each
    (within `tol`, default the learner's dtype's `canary_tolerance`; closer to the update
    than to what was served before and than to the base model), then unload the adapter
    it `replaces` (if any); return the policy that now serves it. A replica that fails the
    canary is rolled back with the others (`load_everywhere`)."""
    return save_update(model, tokenizer, path, lora, tol).serve(policy, name, replaces)
