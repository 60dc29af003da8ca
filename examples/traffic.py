"""Traffic for a `selfevolve serve`, as its users would send it, and the held-out score.

    python examples/traffic.py send --url http://127.0.0.1:8000/v1 --n 800 --offset 0
    python examples/traffic.py score --url http://127.0.0.1:8000/v1 --traces runs/serve/traces.sqlite

`send`: the `openai` client asks `--n` arith questions (arith's train split from `--offset`,
so successive waves ask new ones), 16 at a time, at temperature 1, of the model `--model`
(`evolved`, what `selfevolve evolve` promotes) where the server lists it, else of the base
model. Half the requests carry the reference (`extra_body`: the server's verifier scores the
answer as it logs it); for a quarter of the rest the "user" — who knows the answer — posts a
verdict after the fact, once every answer of the wave is in (`selfevolve.feedback_for`).

`score`: the held-out traffic — the `test` role of the store's task ids, carved by hash as
every recipe carves it (eval_fraction=0.2, seed 0), never trained on and never used by the
gate — answered greedily by the base model and by `evolved`, with the protocol's paired
bootstrap interval on acc_t1 (selfevolve.evaluation.protocol).
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor

import openai

import selfevolve
from selfevolve.data import arith
from selfevolve.data.sources import HOLDOUT, load_tasks
from selfevolve.evaluation.evaluate import evaluate
from selfevolve.evaluation.protocol import paired_difference
from selfevolve.policies.openai import OpenAIPolicy
from selfevolve.types import SamplingParams
from selfevolve.verifiers import get_verifier


def send(url: str, n: int, offset: int, model: str, seed: int) -> dict:
    client = openai.OpenAI(base_url=url, api_key="-", max_retries=2)
    served = {m.id for m in client.models.list().data}
    asked = model if model in served else client.models.list().data[0].id
    tasks = arith.tasks("train", n=offset + n, seed=seed)[offset:]
    verifier = get_verifier("numeric")

    def ask(i: int):
        task = tasks[i]
        extra = {"reference": task.reference} if i % 2 == 0 else None  # half carry the reference
        r = client.chat.completions.create(model=asked, messages=[{"role": "user", "content": task.prompt}],
                                           temperature=1.0, seed=seed * 100_000 + offset + i, max_tokens=48,
                                           extra_body=extra)
        return task, r.choices[0].message.content, r.model_extra["selfevolve"]["trace_id"]

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(len(tasks))))
    judged = [a for i, a in enumerate(answers) if i % 2 == 1 and i % 8 == 1]  # a quarter of the rest
    verdicts = verifier.verify_batch([t for t, _, _ in judged], [text for _, text, _ in judged])
    for (_, _, trace_id), v in zip(judged, verdicts):
        selfevolve.feedback_for(trace_id, v.score, base_url=url)
    return {"asked": asked, "requests": len(answers), "with_reference": len(answers[::2]),
            "user_feedback": len(judged)}


def score(url: str, traces: str, model: str, seed: int, bootstrap: int) -> dict:
    # the scorable held-out traffic, carved as evolve's recipes carve it (their seed=0, whatever --seed is)
    tasks = load_tasks(traces, split="test", holdout=HOLDOUT, seed=0)
    verifier = get_verifier("numeric")
    greedy = SamplingParams(temperature=0.0, max_new_tokens=48)
    runs = {}
    for who in ("base", model):
        policy = OpenAIPolicy(url, model=None if who == "base" else who)
        runs[who] = evaluate(policy, tasks, verifier, max_turns=1, sampling=greedy, baseline_temperature=None,
                             bootstrap=bootstrap, seed=seed)
    diff = paired_difference(runs["base"][1], runs[model][1], resamples=bootstrap, seed=seed)
    return {"tasks": len(tasks), "base_acc_t1": runs["base"][0]["acc_t1"], f"{model}_acc_t1": runs[model][0]["acc_t1"],
            "gain": diff["difference"]["acc_t1"], "interval": diff["intervals"]["acc_t1"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["send", "score"])
    p.add_argument("--url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--n", type=int, default=800, help="send: requests in this wave")
    p.add_argument("--offset", type=int, default=0, help="send: first arith train task of this wave")
    p.add_argument("--model", default="evolved", help="the promoted version's name (evolve's serve_as)")
    p.add_argument("--traces", default="runs/serve/traces.sqlite", help="score: the server's trace store")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bootstrap", type=int, default=2000)
    a = p.parse_args()
    out = (send(a.url, a.n, a.offset, a.model, a.seed) if a.what == "send"
           else score(a.url, a.traces, a.model, a.seed, a.bootstrap))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
