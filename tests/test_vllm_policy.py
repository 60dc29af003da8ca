"""VLLMPolicy without vLLM in this virtualenv: the clear error, and the conversions between
selfevolve and vLLM's data shapes (RequestOutput / CompletionOutput / Logprob, built as plain
objects). The real engine's outputs are checked against these shapes in the vllm tier
(tests/test_vllm_inprocess.py)."""

from types import SimpleNamespace as NS

import pytest

from selfevolve.errors import UserError
from selfevolve.policies.vllm import prompt_token_logprobs, turns_from_output, vllm_sampling_kwargs
from selfevolve.types import SamplingParams
from tests.test_cli import cli


def test_missing_vllm_is_a_one_line_error():
    try:
        import vllm  # noqa: F401
        pytest.skip("vllm is installed here")
    except ImportError:
        pass
    from selfevolve.policies import VLLMPolicy
    with pytest.raises(UserError, match=r"selfevolve\[vllm\]"):
        VLLMPolicy("tiny")
    r = cli("refine", "prompt=What is 1 + 1?", "policy=vllm")
    assert r.returncode == 2 and "selfevolve[vllm]" in r.stderr and "Traceback" not in r.stderr


def test_sampling_kwargs():
    kw = vllm_sampling_kwargs(SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=7, n=4, seed=3, logprobs=True))
    assert kw == {"n": 4, "temperature": 1.0, "top_p": 0.9, "max_tokens": 7, "seed": 3, "stop": None, "logprobs": 0}
    # every request of a batch its own seed: one seed for all would correlate the samples
    seeds = [vllm_sampling_kwargs(SamplingParams(seed=3), i)["seed"] for i in range(4)]
    assert seeds == [3, 4, 5, 6] and vllm_sampling_kwargs(SamplingParams(), 2)["seed"] is None


def test_outputs_to_turns_and_prompt_logprob():
    lp = lambda x: NS(logprob=x)  # noqa: E731
    out = NS(
        outputs=[
            NS(text=" The answer is 5. ", token_ids=[11, 12], logprobs=[{11: lp(-0.5)}, {12: lp(-0.25), 9: lp(-3)}],
               finish_reason="stop"),
            NS(text="The answer", token_ids=[11], logprobs=None, finish_reason="length"),
        ],
        prompt_token_ids=[1, 2, 3],
        prompt_logprobs=[None, {2: lp(-1.0)}, {3: lp(-2.0), 4: lp(-0.1)}],
    )
    turn, cut = turns_from_output(out)
    assert turn.response == "The answer is 5." and turn.token_ids == [11, 12] and turn.logprobs == [-0.5, -0.25]
    assert (turn.finish_reason, cut.finish_reason) == ("stop", "length")
    assert prompt_token_logprobs(out) == [-1.0, -2.0]
