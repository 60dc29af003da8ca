"""The vllm tier, in process: `policy=vllm` (a `vllm.LLM` in the vLLM virtualenv, with this
project installed there) runs SCoRe and ReST-EM on CPU, each update a new LoRARequest,
verified; and the vLLM outputs the unit tests mock (tests/test_vllm_policy.py) are checked
once against the real engine's."""

import json
import subprocess

import pytest

from tests.conftest import VLLM_PYTHON
from tests.test_vllm_server import SMALL_REST_EM, SMALL_SCORE, check_run, selfevolve_run

pytestmark = pytest.mark.vllm

SHAPES = r'''
import json
from selfevolve.policies.vllm import VLLMPolicy, prompt_token_logprobs, turns_from_output
from selfevolve.policies import HFPolicy
from selfevolve.training.publish import CANARY

def main():
    p = VLLMPolicy("tiny", dtype="float32", max_lora_rank=16)
    from vllm import SamplingParams
    out = p.llm.chat([[{"role": "user", "content": "What is 2 + 3 - 1?"}]],
                     SamplingParams(max_tokens=64, temperature=0.0, logprobs=0), use_tqdm=False)[0]
    turn = turns_from_output(out)[0]
    eos = p.llm.get_tokenizer().convert_tokens_to_ids("<|end|>")
    hf = HFPolicy("tiny", device="cpu")
    print("SHAPES", json.dumps({"finish": turn.finish_reason, "last": turn.token_ids[-1], "eos": eos,
                      "n_ids": len(turn.token_ids), "n_lps": len(turn.logprobs),
                      "served": p.prompt_logprobs(CANARY), "hf": hf.prompt_logprobs(CANARY)}), flush=True)

if __name__ == "__main__":
    main()
'''


def test_vllm_outputs_have_the_shape_the_mocks_assume(tmp_path):
    script = tmp_path / "shapes.py"
    script.write_text(SHAPES)
    r = subprocess.run([VLLM_PYTHON, str(script)], capture_output=True, text=True, timeout=900)
    line = next((x for x in r.stdout.splitlines() if x.startswith("SHAPES ")), None)
    # the result, not the exit code: vLLM's engine threads once aborted the interpreter's own
    # teardown after the work was done ("terminate called without an active exception")
    assert line is not None, f"exit {r.returncode}: {r.stderr[-3000:]}"
    got = json.loads(line[7:])
    assert got["finish"] == "stop" and got["last"] == got["eos"]  # the stop token is in token_ids
    assert got["n_ids"] == got["n_lps"]
    assert len(got["served"]) == len(got["hf"]) and max(abs(a - b) for a, b in zip(got["served"], got["hf"])) < 1e-3


def test_recipes_with_policy_vllm(tmp_path):
    for name, small in (("score", SMALL_SCORE), ("rest_em", SMALL_REST_EM)):
        r = selfevolve_run(*small, "policy=vllm", f"run_dir={tmp_path / name}", python=VLLM_PYTHON)
        assert r.returncode == 0, r.stderr[-3000:]
        check_run(tmp_path / name, 0)
    steps = [json.loads(x) for x in (tmp_path / "score" / "metrics.jsonl").read_text().splitlines()]
    assert sum("loss" in s and "eval" not in s for s in steps) == 4
