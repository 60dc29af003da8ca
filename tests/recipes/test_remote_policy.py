"""Every recipe trains the model a running server serves (`policy=openai model=URL`): rollouts
and evaluations over real HTTP, the learner on the weights the server reports it loaded
(`root` in /v1/models), each update pushed through /v1/load_lora_adapter and verified by
the canary over /v1/completions (echo). The same path drives `vllm serve --enable-lora`."""

import json

import httpx
import pytest

from selfevolve.serving.process import ServerProcess
from tests.test_cli import cli

SMALL = ["eval_limit=4", "val_limit=4", "max_new_tokens=16", "threads=2"]


@pytest.fixture(scope="module")
def server():
    with ServerProcess("model=tiny") as s:
        yield s


@pytest.mark.parametrize("recipe", [
    ["recipe=score", "stage1_steps=1", "stage2_steps=1", "batch_tasks=4", "train_tasks=8"],
    ["recipe=rest_em", "iterations=1", "train_tasks=8", "num_samples=2", "epochs=1"],
    ["recipe=star", "iterations=1", "train_tasks=8", "epochs=1"],
    ["recipe=spin", "iterations=1", "train_tasks=8", "epochs=1"],
    ["recipe=self_evolve", "iterations=1", "meta_tasks=4", "evolve_tasks=4", "epochs=1", "refine_samples=1",
     "critique_tokens=16"],
], ids=lambda r: r[0].removeprefix("recipe="))
def test_a_recipe_trains_what_a_server_serves(recipe, server, tmp_path):
    r = cli("run", *recipe, "policy=openai", f"model={server.url}/v1", *SMALL, f"run_dir={tmp_path / 'run'}")
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["before"]["n"] == summary["after"]["n"] == 4
    published = sorted(p.name for p in (tmp_path / "run" / "adapters").iterdir())
    served = [m["id"].split("@")[0] for m in httpx.get(server.url + "/v1/models").json()["data"]]
    assert set(published) & set(served), (published, served)  # the server serves the run's last update


def test_an_endpoint_that_does_not_say_where_its_weights_are_needs_base_model(server, tmp_path):
    r = cli("run", "recipe=score", "policy=openai", f"model={server.url}/v1", "base_model=/nonexistent", *SMALL,
            f"run_dir={tmp_path / 'run'}")
    assert r.returncode == 2 and "model=/nonexistent" in r.stderr and "Traceback" not in r.stderr
