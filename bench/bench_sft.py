"""SFT throughput: the selfevolve M-step (`selfevolve.training.learner.sft`) versus TRL's
`SFTTrainer`, side by side in one process, on the same tiny model, data (1,000 arith
conversations, loss on the answer only), batch size 32, one epoch, and LoRA settings
(r=16, alpha=32, peft's default target modules for GPT-2). Target >= 1.0x.

Tokens/s counts the tokens of every training sequence (prompt + answer, no padding), the
same data for both, over the wall time of the training call alone (model and data
preparation excluded on both sides). TRL's settings are matched to the M-step's: constant
learning rate, no weight decay, no gradient checkpointing, fp32 (TRL 1.16 defaults to
gradient checkpointing and bf16; with checkpointing on, the same epoch took 98 s on this
machine instead of ~5 s). TRL is installed only for this benchmark (`pip install
".[bench]"`); without it the comparison is skipped.
"""

from __future__ import annotations

import time

import torch

from selfevolve.data import arith
from selfevolve.policies import resolve_model_path
from selfevolve.training.learner import encode_chat, lora_model, sft

N, BATCH, R, ALPHA, LR = 1000, 32, 16, 32, 1e-3


def conversations() -> list:
    out = []
    for nums, ops in arith.sample_problems(0, "train", N, 3):
        q = arith.question(arith.render(nums, ops))
        out.append([{"role": "user", "content": q}, {"role": "assistant", "content": arith.step_solution(nums, ops)}])
    return out


def ours(path, tokenizer, convs) -> float:
    torch.manual_seed(0)
    model = lora_model(path, r=R, alpha=ALPHA)
    t0 = time.perf_counter()
    sft(model, tokenizer, convs, epochs=1, lr=LR, batch_size=BATCH, seed=0)
    return time.perf_counter() - t0


def trl_sft(path, tokenizer, convs) -> float:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(0)
    data = Dataset.from_list([{"prompt": c[:1], "completion": c[1:]} for c in convs])
    args = SFTConfig(output_dir="/tmp/selfevolve-bench-trl", per_device_train_batch_size=BATCH, num_train_epochs=1,
                     learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                     save_strategy="no", report_to=[], logging_steps=1000, use_cpu=True, dataloader_num_workers=0,
                     max_length=256, seed=0, disable_tqdm=True, gradient_checkpointing=False, bf16=False)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(path), args=args, train_dataset=data,
                         processing_class=tokenizer,
                         peft_config=LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, task_type="CAUSAL_LM"))
    t0 = time.perf_counter()
    trainer.train()
    return time.perf_counter() - t0


def run() -> dict:
    from transformers import AutoTokenizer

    torch.set_num_threads(2)
    path = resolve_model_path("tiny")
    tokenizer = AutoTokenizer.from_pretrained(path)
    convs = conversations()
    tokens = sum(len(encode_chat(tokenizer, c, train_on="last")[0]) for c in convs)
    ours(path, tokenizer, convs[:64])  # warm-up
    ours_s = ours(path, tokenizer, convs)
    rows = [("selfevolve M-step (learner.sft)", f"{tokens / ours_s:,.0f} tokens/s",
             f"{N} conversations in {ours_s:.2f} s")]
    ratios = []
    try:
        import trl
    except ImportError:
        rows.append(("TRL SFTTrainer", "skipped", "pip install trl to compare"))
    else:
        trl_s = trl_sft(path, tokenizer, convs)
        rows.append((f"TRL {trl.__version__} SFTTrainer", f"{tokens / trl_s:,.0f} tokens/s",
                     f"{N} conversations in {trl_s:.2f} s"))
        ratios.append(("selfevolve / TRL (target >= 1.0)", trl_s / ours_s))
    return {"title": "SFT: the ReST-EM/STaR M-step versus TRL's SFTTrainer", "doc": __doc__.strip(), "rows": rows,
            "ratios": ratios}
