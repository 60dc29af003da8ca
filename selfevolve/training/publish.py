"""Publish: how an update reaches the served policy, and the proof that it did (verified
sync; docs/architecture.md, "A recipe step"). This module only publishes and verifies; what
the learner does with the sampler's log-probs is in `losses`.

A recipe trains a model (the learner), then `publish`es it: the adapter is saved to
`run_dir/adapters/NAME`, loaded into the policy that serves rollouts (HFPolicy in process,
vLLM as a new LoRARequest, an OpenAI-compatible server via /v1/load_lora_adapter; on every
replica of a fleet, all or nothing: `load_everywhere`), and verified. Verification is two
checks, because a silent sync failure (the old adapter still active, a half-written file, a
server that ignored the request) makes every later round train on the wrong model's samples:

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

from selfevolve.errors import SyncError, UserError, WriteFailed, disk_full
from selfevolve.training import distributed
from selfevolve.training.learner import text_token_logprobs
from selfevolve.types import AdapterServing

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
CANARY_TOL = {torch.float32: (2e-3, 5e-4), torch.float16: (0.1, 0.02), torch.bfloat16: (0.6, 0.04)}


def canary_tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """The (maximum, mean) absolute per-token canary tolerance for weights in `dtype`.

    >>> canary_tolerance(torch.float32), canary_tolerance(torch.bfloat16)
    ((0.002, 0.0005), (0.6, 0.04))
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


def server_mismatch(parts: dict, tol: float) -> str | None:
    """The learner scores the tokens the server sampled, with the weights the server was sent:
    a KL between them above `tol` means the server samples from another model (an adapter
    that never arrived, a stale version, a different dtype or template)."""
    if parts.get("logprob_kl", 0.0) > tol:
        return (f"KL(server ‖ learner) on the sampled tokens is {parts['logprob_kl']:.4f} (ratio "
                f"{parts['logprob_ratio']:.3f}): the server samples from another model?")
    return None


def load_everywhere(policy: AdapterServing, path: str | Path, name: str, check=None) -> None:
    """Load adapter `name` from `path` on every replica that serves `policy` (a fleet's
    `replicas`, else the policy itself) and run `check(replica)` on each — all or nothing.

    A replica that fails (the load is refused, the server is unreachable, `check` raises) is
    put back as it was; then either the fleet drops it (`FleetPolicy.should_drop`: with
    `on_sync_error=drop`, or when it is unreachable) and the others go on, or every replica
    already updated is rolled back too and SyncError names the replica: no replica ever
    serves a different model from the others, and a failed sync leaves the previous adapter
    serving."""
    replicas = list(getattr(policy, "replicas", [policy]))
    done = []
    for replica in replicas:
        before = (replica.active_adapter, replica.adapters.get(name))
        try:
            replica.load_adapter(str(path), name)
            if check is not None:
                check(replica)
        except Exception as e:  # noqa: BLE001 - whatever failed, the replica must be put back
            why = f"{type(e).__name__}: {str(e)[:300]}"
            _roll_back(replica, name, *before)
            where = getattr(replica, "url", None)
            if hasattr(policy, "should_drop") and policy.should_drop(e):
                policy.drop(replica, f"adapter {name!r} did not sync: {why}")
                continue
            for other, *was in done:
                _roll_back(other, name, *was)
            rolled = f"; the other {len(done)} replica(s) were rolled back to {before[0]!r}" if done else ""
            raise SyncError(f"{'replica ' + where if where else 'the policy'} did not take adapter {name!r} "
                            f"({why}){rolled}") from None
        done.append((replica, *before))


def _roll_back(replica: AdapterServing, name: str, active: str | None, old_path: str | None) -> None:
    """Undo `replica.load_adapter(..., name)`: the old version of `name` (or none), and the
    adapter that was active. Best effort: an unreachable replica cannot be put back, and the
    error that brought us here is the one to report."""
    try:
        if old_path is not None:
            if replica.adapters.get(name) != old_path:
                replica.load_adapter(old_path, name)
        elif name in replica.adapters:
            replica.unload_adapter(name)
        replica.set_adapter(active)
    except Exception:  # noqa: BLE001
        pass


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
