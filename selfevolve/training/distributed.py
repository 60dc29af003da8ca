"""Data parallelism for the learner: torch.distributed, launched by torchrun.

    selfevolve run recipe=score nproc=2      # = torchrun --nproc-per-node=2 -m selfevolve.cli run recipe=score

Every rank holds the whole learner (LoRA weights broadcast from rank 0 at creation) and its
own serving engine. Work is split into contiguous shards of the batch (`shard`): each rank
generates and verifies its shard's rollouts, then `gather` gives every rank the whole batch
in the single-process order. Each rank back-propagates *its share of the full batch's loss*:
every normaliser is batch-wide (SFT's token count, SCoRe's episode count, SPIN's pair
count) and every statistic is computed on the gathered batch (SCoRe's leave-one-out
baseline). The shares' gradients are then summed (`sum_grads`, one all-reduce), so every
rank applies the full batch's gradient and the weights stay identical on every rank without
a second broadcast. That is why this is an all-reduce of gradients and not the
DistributedDataParallel wrapper: DDP *averages* gradients of per-rank means, which equals
the full batch's gradient only when every rank holds the same number of tokens, and a
recipe's several forward passes per step (micro-batches, the reference under
`disable_adapter`) would need `no_sync` plumbing for what is one collective on LoRA-sized
tensors.

Rank 0 alone writes the run directory (Run); the other ranks mirror its trace store in
memory so a recipe's queries agree, receive its evaluations, and load each published adapter
from the file rank 0 saved. gloo on CPU, NCCL on GPU (one device per rank, `LOCAL_RANK`).
With one process every function here is the identity, so the single-process path is
unchanged.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def init() -> None:
    """Join the process group torchrun describes (WORLD_SIZE > 1 in the environment)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        atexit.register(_leave)


def _leave() -> None:
    """Tear the process group down before the interpreter does: left to shutdown, gloo's
    threads can be destroyed while joinable ("terminate called without an active
    exception", rank exit -6, seen once in ten two-process runs)."""
    if dist.is_initialized():  # no barrier: a rank leaving on an error must not wait for the others
        dist.destroy_process_group()


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def bounds(n: int, r: int | None = None, w: int | None = None) -> tuple[int, int]:
    """[lo, hi) of rank `r`'s contiguous shard of n items among `w` ranks (default: this
    rank, this world); sizes differ by at most one.

    >>> [bounds(5, r, 2) for r in range(2)], bounds(5)
    ([(0, 2), (2, 5)], (0, 5))
    """
    r, w = rank() if r is None else r, world() if w is None else w
    return n * r // w, n * (r + 1) // w


def rank_seed(seed: int) -> int:
    """A sampling seed for this rank's shard: rank 0 keeps `seed` (one process is unchanged),
    rank r draws from `seed + r·1_000_000_007` so ranks never share random numbers."""
    return seed + rank() * 1_000_000_007


def shard(items: list[T]) -> list[T]:
    """This rank's contiguous share of `items` (all of them with one process)."""
    lo, hi = bounds(len(items))
    return items[lo:hi]


def gather(items: list[T]) -> list[T]:
    """Every rank's `items` concatenated in rank order, on every rank: `gather(shard(x)) == x`."""
    if world() == 1:
        return items
    parts: list[Any] = [None] * world()
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def total(x: float) -> float:
    """The sum of `x` over the ranks."""
    if world() == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return float(t.item())


def from_main(fn: Callable[[], T]) -> T:
    """`fn()` run on rank 0 alone (it writes, or it is the one that can), its result sent to
    every rank. An exception on rank 0 ends the run there; torchrun then stops the others."""
    if world() == 1:
        return fn()
    box: list[Any] = [fn() if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def broadcast_params(model: torch.nn.Module) -> None:
    """Rank 0's trainable weights on every rank (a fresh LoRA adapter is randomly initialised)."""
    if world() == 1:
        return
    for p in model.parameters():
        if p.requires_grad:
            dist.broadcast(p.data, src=0)


def sum_grads(params: list[torch.Tensor]) -> None:
    """Sum the gradients of `params` over the ranks, in one all-reduce of a flat buffer. Each
    rank back-propagated its share of the full batch's loss, so the sum is the full batch's
    gradient. A parameter without a gradient on this rank (its shard was empty) counts as 0."""
    if world() == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset : offset + g.numel()].view_as(g)
        offset += g.numel()
