"""One SFT step, one SCoRe step and one SPIN step on a fixed batch, as the recipes take them;
run by tests/training/test_distributed.py under torchrun with 1 and 2 processes. Rank 0 saves each
trained adapter's weights and gradient to OUT/{sft,score,spin}.pt (and the initial ones to OUT/init.pt).

    torchrun --standalone --nproc-per-node=2 tests/training/ddp_steps.py OUT
"""

import sys
from pathlib import Path

import torch
from peft import get_peft_model_state_dict
from transformers import AutoTokenizer

from selfevolve.models import resolve_model_path
from selfevolve.recipes.score import ScoreConfig, train_step
from selfevolve.recipes.spin import SpinConfig, opponent_logprobs, spin_step
from selfevolve.training import distributed
from selfevolve.training.learner import sft, trainable_model
from selfevolve.types import Feedback, Task, Trace, Turn

# Uneven rows (lengths differ), so a shard's token count is not half the batch's.
TASKS = [Task(id=f"t{i}", prompt=f"What is {a} + {b}?", reference=str(a + b))
         for i, (a, b) in enumerate([(2, 3), (17, 25), (4, 9), (123, 456), (8, 8), (31, 7), (600, 75)])]


def learner():
    torch.manual_seed(0)
    return trainable_model("tiny", r=4, alpha=8)


def weights(model) -> dict:
    """The adapter's weights, and the gradient of the step that made them (summed over ranks)."""
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()} | {"grad": grads}


def main(out: Path) -> None:
    distributed.init()
    tok = AutoTokenizer.from_pretrained(resolve_model_path("tiny"))
    saved = {}

    model = learner()
    saved["init"] = weights(model)
    convs = [[{"role": "user", "content": t.prompt}, {"role": "assistant", "content": f"The answer is {t.reference}."}]
             for t in TASKS]
    sft(model, tok, convs, epochs=1, lr=1e-2, batch_size=len(convs), micro_batch_size=2)
    saved["sft"] = weights(model)

    # SCoRe Stage II: every (r1, r2) combination, so the leave-one-out baselines are batch-wide.
    rewards = [(1, 1), (1, 0), (0, 1), (0, 0), (0, 1), (1, 1), (0, 0)]
    traces = [Trace(task=t, turns=[Turn(response=f"The answer is {int(t.reference) + 1 - r1}.",
                                        feedback=Feedback(score=float(r1))),
                                   Turn(response=f"The answer is {int(t.reference) + 1 - r2}.",
                                        feedback=Feedback(score=float(r2)))])
              for t, (r1, r2) in zip(TASKS, rewards)]
    cfg = ScoreConfig(nproc=distributed.world(), batch_tasks=len(traces), micro_batch_size=2, logprob_check=0)
    model = learner()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    train_step(model, opt, traces, tok, tok.pad_token_id, 2, cfg, 0)
    saved["score"] = weights(model)

    pairs = [{"task": t, "gold": f"The answer is {t.reference}.", "self": f"It is {int(t.reference) - 1}."}
             for t in TASKS]
    cfg = SpinConfig(nproc=distributed.world(), micro_batch_size=2, lam=1.0)
    model = learner()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    refs = opponent_logprobs(model, tok, tok.pad_token_id, pairs)
    model.train()
    spin_step(model, opt, tok, tok.pad_token_id, pairs, refs, cfg, 0)
    saved["spin"] = weights(model)

    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        for name, w in saved.items():
            torch.save(w, out / f"{name}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
