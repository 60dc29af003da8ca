"""What one training forward/backward costs per token on a real model, and what that says
about a 7B model with a 152k vocabulary on one GPU at the default settings.

Measured: SmolLM2-135M-Instruct (fp32, CPU, LoRA r=16 on every linear layer, gradient
checkpointing on: the defaults), one process per shape, the log-probabilities of two rows of
W tokens and their backward (`learner.token_logprobs`, what every recipe's step runs; the
output layer in chunks), peak RSS above the process's level with the model loaded, for
W = 256, 1,024 and 2,048, and 1,024 without checkpointing (the baseline). A line through the
three gives a per-token cost (the checkpointed layer inputs and one layer's recomputation)
and a fixed part (the output layer's chunk of
logits, learner.LOGITS_BUDGET, and its softmax).

Estimated, from those two numbers: Qwen2.5-7B-Instruct's shape (28 layers, hidden 3,584,
MLP 18,944, 4 key-value heads of 128, 152,064-token vocabulary, 7.6B parameters) in bf16 with
the same defaults. The per-token cost scales with layers × hidden × bytes per value; a
micro-batch holds training.ACTIVATION_BUDGET / (layers × hidden) tokens; the fixed part
stays (the chunk is counted in elements, in fp32). Beside it: the bf16 weights (twice with
policy=hf, where the served model and the learner are two copies in one process; once
beside vLLM's own share with policy=vllm), the LoRA adapter with its gradient and AdamW's two
moments in fp32, and the KV cache of a 64-row generation batch of 300-token SCoRe turns.
"""

from __future__ import annotations

import json
import subprocess
import sys

from selfevolve.fixtures import smollm2
from selfevolve.models import resolve_model_path
from selfevolve.training.learner import ACTIVATION_BUDGET

WIDTHS = (256, 1024, 2048)
CHILD = r"""
import json, sys, threading, time, torch
from selfevolve.training.learner import trainable_model, token_logprobs
def rss(): return int(open("/proc/self/statm").read().split()[1]) * 4096
model = trainable_model(sys.argv[1], gradient_checkpointing=sys.argv[3] == "1"); model.train()
ids = torch.randint(0, 1000, (2, int(sys.argv[2])))
batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
with torch.no_grad(): token_logprobs(model, batch)  # warm: the allocator settles
time.sleep(0.2); idle = rss(); peak = [idle]; done = []
def poll():
    while not done: peak[0] = max(peak[0], rss()); time.sleep(0.002)
t = threading.Thread(target=poll); t.start()
lp, _ = token_logprobs(model, batch); (-lp.sum()).backward()
done.append(1); t.join()
print(json.dumps({"idle": idle, "step": peak[0] - idle}))
"""
SEVEN_B = dict(layers=28, hidden=3584, mlp=18944, kv=4 * 128, params=7.62e9)
SMOL = dict(layers=30, hidden=576, bytes=4)


def lora_params(layers: int, hidden: int, mlp: int, kv: int, r: int = 16) -> int:
    """LoRA parameters on every linear layer of a Llama block (q, k, v, o, gate, up, down)."""
    return layers * r * (2 * (hidden + hidden) + 2 * (hidden + kv) + 3 * (hidden + mlp))


def run() -> dict:
    model = str(resolve_model_path(str(smollm2())))
    def step(w: int, checkpointing: bool = True) -> float:  # MiB
        out = subprocess.run([sys.executable, "-c", CHILD, model, str(w), str(int(checkpointing))],
                             capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])["step"] / 2**20

    steps = {w: step(w) for w in WIDTHS}
    plain = step(1024, checkpointing=False)
    tokens = [2 * w for w in WIDTHS]
    n = len(tokens)
    mx, my = sum(tokens) / n, sum(steps.values()) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(tokens, steps.values())) / sum((x - mx) ** 2 for x in tokens)
    fixed = my - slope * mx  # MiB
    gib = 2**30
    s = SEVEN_B
    scale = (s["layers"] * s["hidden"] * 2) / (SMOL["layers"] * SMOL["hidden"] * SMOL["bytes"])
    micro_tokens = ACTIVATION_BUDGET // (s["layers"] * s["hidden"])
    seven = (fixed + slope * scale * micro_tokens) * 2**20 / gib
    weights = s["params"] * 2 / gib
    adapter = lora_params(s["layers"], s["hidden"], s["mlp"], s["kv"]) * 16 / gib  # fp32 weight, grad, 2 moments
    kv = 64 * 300 * s["layers"] * 2 * s["kv"] * 2 / gib
    hf = 2 * weights + adapter + seven + kv
    rows = [(f"SmolLM2-135M step, 2 rows x {w} tokens", f"{steps[w]:.0f} MiB above the loaded model",
             f"{steps[w] * 1024 / (2 * w):.0f} KiB per token in all") for w in WIDTHS]
    rows += [("SmolLM2-135M step, 2 rows x 1024 tokens, gradient_checkpointing=false", f"{plain:.0f} MiB", "")]
    rows += [("SmolLM2-135M, fitted", f"{slope * 1024:.0f} KiB per token + {fixed:.0f} MiB fixed",
              "per token: checkpointed layer inputs and one layer's recompute; fixed: the logits chunk"),
             ("7B/152k estimate: one micro-batch's step", f"{seven:.2f} GiB",
              f"{micro_tokens} tokens x {slope * scale * 1024:.0f} KiB + {fixed:.0f} MiB"),
             ("7B/152k estimate: weights (bf16)", f"{weights:.1f} GiB", "x2 with policy=hf (server and learner)"),
             ("7B/152k estimate: LoRA r=16, grad, AdamW", f"{adapter:.2f} GiB", "fp32"),
             ("7B/152k estimate: KV cache, 64 rows x 300 tokens", f"{kv:.2f} GiB", "generation, bf16"),
             ("7B/152k estimate: policy=hf, one GPU", f"{hf:.1f} GiB", "fits an 80 GB GPU"),
             ("7B/152k estimate: policy=vllm, the learner's part", f"{weights + adapter + seven:.1f} GiB",
              "beside vLLM's gpu_memory_utilization share")]
    return {"title": "Training-step memory per token, and a 7B estimate", "doc": __doc__.strip(), "rows": rows,
            "ratios": [("SmolLM2 step at 2 x 1024 tokens: gradient checkpointing off / on (the default)",
                        plain / steps[1024])]}


if __name__ == "__main__":
    print(run())
