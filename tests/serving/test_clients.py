"""The clients people already point at an OpenAI-compatible server, run for real against
`selfevolve serve model=tiny` on 40 arith questions: lm-evaluation-harness (a generate_until
task through `local-completions` with its defaults — token-id prompts — and through
`local-chat-completions`, and a multiple-choice loglikelihood task), inspect-ai's
`openai-api` provider with its `match()` scorer, and litellm, plain and streaming. Each
accuracy is compared with what `selfevolve eval` gives on the same questions, or, for the
loglikelihood task, with the log-probs computed directly on the model."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from selfevolve.serving.process import ServerProcess

KEY = "clients-key"
N, MAX_TOKENS = 40, 96


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The questions (JSONL), `selfevolve eval`'s accuracy on them, and a running server."""
    from selfevolve.data import arith
    from selfevolve.models import resolve_model_path

    d = tmp_path_factory.mktemp("clients")
    tasks = arith.tasks("test", n=N, seed=3)
    with open(d / "questions.jsonl", "w") as f:
        for t in tasks:
            f.write(json.dumps({"id": t.id, "prompt": t.prompt, "answer": t.reference}) + "\n")
    subprocess.run([sys.executable, "-m", "selfevolve.cli", "eval", f"data={d / 'questions.jsonl'}",
                    "verifier=numeric", f"max_new_tokens={MAX_TOKENS}", f"out={d / 'eval.json'}"], check=True,
                   capture_output=True)
    accuracy = json.loads((d / "eval.json").read_text())["acc_t1"]
    assert 0.5 < accuracy < 1  # a comparison that could fail: neither all right nor all wrong
    server = ServerProcess(f"api_key={KEY}", f"traces={d / 'traces.sqlite'}", "verifier=numeric")
    yield {"dir": d, "tasks": tasks, "accuracy": accuracy, "url": server.url + "/v1",
           "tokenizer": str(resolve_model_path("tiny"))}
    server.stop()


def numeric_accuracy(answers: list[str], tasks) -> float:
    from selfevolve.verifiers import get_verifier

    verifier = get_verifier("numeric")
    return sum(verifier.verify(t, a).score == 1.0 for t, a in zip(tasks, answers)) / len(tasks)


# --- lm-evaluation-harness -----------------------------------------------------------------


def lm_eval_run(world, model: str, task: str, **model_args) -> dict:
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    d = world["dir"]
    (d / "tasks").mkdir(exist_ok=True)
    data = f"{{test: {d / 'questions.jsonl'}}}"
    (d / "tasks" / "gen.yaml").write_text(textwrap.dedent(f"""\
        task: tiny_arith_gen
        dataset_path: json
        dataset_kwargs: {{data_files: {data}}}
        test_split: test
        output_type: generate_until
        doc_to_text: "{{{{prompt}}}}"
        doc_to_target: "{{{{answer}}}}"
        generation_kwargs: {{until: ["\\n\\n"], max_gen_toks: {MAX_TOKENS}, do_sample: false, temperature: 0}}
        filter_list:
          - name: last-number
            filter:
              - {{function: regex, regex_pattern: "(-?[0-9]+(?:\\\\.[0-9]+)?)", group_select: -1}}
              - {{function: take_first}}
        metric_list: [{{metric: exact_match}}]
        """))
    mc = d / "mc.jsonl"
    if not mc.exists():
        with open(mc, "w") as f:
            for t in world["tasks"]:
                right = int(t.reference)
                choices = [str(right), str(right + 1), str(right - 2)]
                f.write(json.dumps({"prompt": t.prompt, "choices": choices, "label": 0}) + "\n")
    (d / "tasks" / "mc.yaml").write_text(textwrap.dedent(f"""\
        task: tiny_arith_mc
        dataset_path: json
        dataset_kwargs: {{data_files: {{test: {mc}}}}}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{prompt}}}} The answer is"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: "{{{{label}}}}"
        metric_list: [{{metric: acc}}]
        """))
    args = {"model": "tiny", "base_url": world["url"] + ("/chat/completions" if "chat" in model else "/completions"),
            "num_concurrent": 4, "max_retries": 1, **model_args}
    out = lm_eval.simple_evaluate(model=model, model_args=args, tasks=[task],
                                  task_manager=TaskManager(include_path=str(d / "tasks")),
                                  apply_chat_template=task == "tiny_arith_gen", log_samples=False)
    return out["results"][task]


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def test_lm_eval_local_completions_generate_until(world, key):
    """Its defaults: the prompt tokenised by the model's own tokenizer and sent as token ids
    (chat template applied, as `selfevolve eval` prompts)."""
    got = lm_eval_run(world, "local-completions", "tiny_arith_gen", tokenizer=world["tokenizer"])
    assert got["exact_match,last-number"] == pytest.approx(world["accuracy"])


def test_lm_eval_local_chat_completions_generate_until(world, key):
    got = lm_eval_run(world, "local-chat-completions", "tiny_arith_gen")
    assert got["exact_match,last-number"] == pytest.approx(world["accuracy"])


def test_lm_eval_multiple_choice_loglikelihood(world, key, tiny):
    """lm-eval's multiple-choice accuracy through echoed log-probs equals the choice a direct
    computation on the model makes (context and continuation tokenised as lm-eval does)."""
    import torch

    got = lm_eval_run(world, "local-completions", "tiny_arith_mc", tokenizer=world["tokenizer"])
    tok, right = tiny.tokenizer, 0
    for line in (world["dir"] / "mc.jsonl").read_text().splitlines():
        doc = json.loads(line)
        context = f"{doc['prompt']} The answer is"
        scores = []
        for choice in doc["choices"]:
            ctx = tok(context, add_special_tokens=False)["input_ids"]
            whole = tok(f"{context} {choice}", add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(tiny.model(input_ids=torch.tensor([whole])).logits[0, :-1].float(), -1)
            scores.append(sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole))))
        right += max(range(len(scores)), key=scores.__getitem__) == doc["label"]
    assert got["acc,none"] == pytest.approx(right / N) and 0 < right < N


# --- inspect-ai ------------------------------------------------------------------------------


def test_inspect_ai_with_match(world, monkeypatch, tmp_path):
    pytest.importorskip("inspect_ai")
    from inspect_ai import Task
    from inspect_ai import eval as inspect_eval
    from inspect_ai.dataset import Sample
    from inspect_ai.scorer import match
    from inspect_ai.solver import generate

    monkeypatch.setenv("LOCAL_API_KEY", KEY)
    task = Task(dataset=[Sample(input=t.prompt, target=t.reference) for t in world["tasks"]], solver=generate(),
                scorer=match(numeric=True))
    log = inspect_eval(task, model="openai-api/local/tiny", model_base_url=world["url"], log_dir=str(tmp_path),
                       display="none", temperature=0, max_tokens=MAX_TOKENS)[0]
    assert log.status == "success"
    assert log.results.scores[0].metrics["accuracy"].value == pytest.approx(world["accuracy"])


# --- litellm ---------------------------------------------------------------------------------


def test_litellm_plain_and_streaming(world, monkeypatch):
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # its bundled copy: no fetch from the network
    litellm = pytest.importorskip("litellm")

    def ask(t, stream: bool) -> str:
        r = litellm.completion(model="openai/tiny", api_base=world["url"], api_key=KEY, temperature=0,
                               max_tokens=MAX_TOKENS, messages=[{"role": "user", "content": t.prompt}], stream=stream)
        if not stream:
            return r.choices[0].message.content
        return "".join(c.choices[0].delta.content or "" for c in r)

    plain = [ask(t, False) for t in world["tasks"]]
    assert numeric_accuracy(plain, world["tasks"]) == pytest.approx(world["accuracy"])
    streamed = [ask(t, True) for t in world["tasks"][:10]]
    assert streamed == plain[:10]
