"""Memory and throughput of a whole `selfevolve run recipe=score` on a randomly initialised
Llama-shaped model (speed and memory need no trained weights), at default settings:

    selfevolve run recipe=score model=RANDOM device=DEVICE stage1_steps=1 stage2_steps=1
                   batch_tasks=N eval_limit=8 val_limit=8

for N = 8 and 64. The model has Qwen2.5-0.5B's shape (24 layers, hidden 896, 14 heads, 2
key-value heads, MLP 4,864, a 151,936-token vocabulary: 494M parameters) and a word-level
tokenizer of the same size with a ChatML template, both built here (no hub). What it answers
is noise, so every attempt runs to max_new_tokens: the longest rows a run can have.

Peak memory is the process's GPU memory on CUDA (the device's used memory, polled, above
what it was before the run: CUDA context and caching allocator included) and its peak RSS on
CPU. `python bench/bench_gpu.py [--small] [--out FILE]`: --small is a 2-layer, 128-wide model
of the same vocabulary, batch sizes 4 and 8 and 16 new tokens, what CI runs on CPU
(tests/test_bench_gpu.py); bench/gpu.sh runs the full shape on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

QWEN05 = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
              num_key_value_heads=2, vocab_size=151936)
SMALL = dict(QWEN05, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def random_llama(where: Path, shape: dict, seed: int = 0) -> Path:
    """A Llama-shaped model with random weights and a word-level tokenizer of its vocabulary,
    saved as a Hugging Face directory."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    special = ["<unk>", "<|im_start|>", "<|im_end|>", "<pad>"]
    vocab = {t: i for i, t in enumerate(special + [f"w{i}" for i in range(shape["vocab_size"] - len(special))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>",
                                        pad_token="<pad>", bos_token="<|im_start|>")
    tokenizer.chat_template = CHATML
    torch.manual_seed(seed)
    config = LlamaConfig(**shape, max_position_embeddings=4096, tie_word_embeddings=True, bos_token_id=1,
                         eos_token_id=2, pad_token_id=3)
    LlamaForCausalLM(config).save_pretrained(where)
    tokenizer.save_pretrained(where)
    return where


class DeviceMemory:
    """The CUDA device's used memory, polled every 50 ms, above its level at start (GiB)."""

    def __init__(self):
        import torch

        self.torch, self.peak, self.done = torch, 0.0, False
        free, total = torch.cuda.mem_get_info()
        self.start = total - free
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self):
        while not self.done:
            free, total = self.torch.cuda.mem_get_info()
            self.peak = max(self.peak, (total - free - self.start) / 2**30)
            time.sleep(0.05)

    def stop(self) -> float:
        self.done = True
        self.thread.join()
        return self.peak


def one_run(model: Path, device: str, n: int, run_dir: Path, *extra: str) -> dict:
    """One whole `selfevolve run` process: peak memory (GiB), seconds, and its updates' time
    sampling and training (from metrics.jsonl)."""
    cmd = [sys.executable, "-m", "selfevolve.cli", "run", "recipe=score", f"model={model}", f"device={device}",
           "stage1_steps=1", "stage2_steps=1", f"batch_tasks={n}", "eval_limit=8", "val_limit=8",
           f"run_dir={run_dir}", *extra]
    watch = DeviceMemory() if device.startswith("cuda") else None
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=run_dir.parent,
                            env={**os.environ, "SELFEVOLVE_QUIET": "1"})
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    peak = watch.stop() if watch else usage.ru_maxrss / 2**20
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"{' '.join(cmd)}: exit {os.waitstatus_to_exitcode(status)}: {err[-2000:].decode()}")
    steps = [r for r in map(json.loads, open(run_dir / "metrics.jsonl")) if "step" in r]
    generate, train = (sum(r.get(k, 0.0) for r in steps) for k in ("time_generate", "time_train"))
    return {"batch_tasks": n, "peak_gib": round(peak, 3), "memory": "GPU (device used, above start)" if watch
            else "peak RSS", "seconds": round(seconds, 1), "time_generate": round(generate, 2),
            "time_train": round(train, 2), "train_episodes_per_s": round(len(steps) * n / max(train, 1e-9), 2)}


def run(small: bool = False, device: str | None = None) -> dict:
    import torch
    from safetensors.torch import load_file

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    shape = SMALL if small else QWEN05
    with tempfile.TemporaryDirectory() as tmp:
        model = random_llama(Path(tmp) / "model", shape)
        params = sum(v.numel() for v in load_file(str(model / "model.safetensors")).values())
        extra = ("max_new_tokens=16",) if small else ()
        runs = [one_run(model, device, n, Path(tmp) / f"run-{n}", *extra) for n in ((4, 8) if small else (8, 64))]
    return {"device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
            "shape": shape, "parameters": params, "runs": runs,
            "flat": round(runs[-1]["peak_gib"] / runs[0]["peak_gib"], 3)}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--device")
    ap.add_argument("--out")
    args = ap.parse_args()
    result = run(args.small, args.device)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
