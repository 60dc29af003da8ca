"""Episodes are trained on what the policy sampled, in the context it sampled it in: the sampled
token ids, no end of turn after a response cut at the budget, and — for a chat template that
rewrites history, as Qwen3's drops <think> from earlier turns — each attempt's own context."""

import pytest

from selfevolve.policies import HFPolicy
from selfevolve.training.learner import IGNORE, encode_chat, encode_turns, episode_batch
from selfevolve.types import SamplingParams, Task, Trace

# ChatML that, like Qwen3's template, renders an assistant turn before the last user turn
# without its reasoning: "<think>...</think>answer" is shown as "answer" in later prompts.
REWRITES_HISTORY = (
    "{%- set ns = namespace(last_user=0) -%}"
    "{%- for m in messages %}{% if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'assistant' and loop.index0 < ns.last_user and '</think>' in m.content -%}"
    "{{- '<|im_start|>assistant\\n' + m.content.split('</think>')[-1].lstrip('\\n') + '<|im_end|>\\n' -}}"
    "{%- else -%}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endfor -%}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{% endif -%}"
)


@pytest.fixture(scope="module")
def rewriting():
    """The bundled model with a history-rewriting template (random-ish weights for this format
    are fine: the test is about which tokens are scored, not what they say)."""
    policy = HFPolicy("tiny", device="cpu")
    policy.tokenizer.chat_template = REWRITES_HISTORY
    return policy


def _episode(policy, first: str, sampling=SamplingParams(max_new_tokens=12)):
    task = Task(id="t", prompt="What is 2 + 3?", reference="5")
    conv = [{"role": "user", "content": task.prompt}]
    (t1,) = policy.generate([conv], sampling)[0]
    ids = policy.tokenizer(first, add_special_tokens=False)["input_ids"]
    t1 = t1.model_copy(update={"response": first, "token_ids": ids})
    conv2 = conv + [{"role": "assistant", "content": first}, {"role": "user", "content": "Check it."}]
    (t2,) = policy.generate([conv2], sampling)[0]
    return Trace(task=task, turns=[t1, t2]), conv2


def test_each_attempt_is_scored_in_the_context_it_was_sampled_in(rewriting):
    trace, conv2 = _episode(rewriting, "<think>2 and 3 make 5</think>The answer is 5.")
    with pytest.raises(ValueError, match="prefix-stable"):  # what the old encoding did with such a template
        encode_chat(rewriting.tokenizer, conv2 + [{"role": "assistant", "content": trace.turns[1].response}])
    batch, m1, m2, rows = episode_batch([trace], rewriting.tokenizer, rewriting.pad_id, "Check it.")
    assert rows.tolist() == [0, 0]  # one row per attempt
    prompt2 = rewriting.encode_prompts([conv2])[0]  # exactly what the policy was given for attempt 2
    assert "<think>" not in rewriting.tokenizer.decode(prompt2)
    row2 = batch["input_ids"][1].tolist()
    assert row2[: len(prompt2)] == prompt2
    second = trace.turns[1].token_ids
    assert row2[len(prompt2): len(prompt2) + len(second)] == second  # the sampled ids themselves
    assert m2[1].sum() >= len(second) and m1[1].sum() == 0 and m2[0].sum() == 0


def test_a_prefix_stable_template_scores_both_attempts_in_one_row(tiny):
    trace, _ = _episode(tiny, "The answer is 5.")
    _, m1, m2, rows = episode_batch([trace], tiny.tokenizer, tiny.pad_id, "Check it.")
    assert rows.tolist() == [0] and m1.sum() > 0 and m2.sum() > 0


def test_a_response_cut_at_the_budget_is_never_taught_an_end_of_turn(tiny):
    conv = [{"role": "user", "content": "Q"}]
    answer = {"role": "assistant", "content": "The answer is 5."}
    done = encode_turns(tiny.tokenizer, conv + [{**answer, "unfinished": False}])
    cut = encode_turns(tiny.tokenizer, conv + [{**answer, "unfinished": True}])
    (done_ids, done_labels, _), (cut_ids, cut_labels, _) = done[0], cut[0]
    taught = lambda ids, labels: [t for t, y in zip(ids, labels) if y != IGNORE]  # noqa: E731
    assert taught(done_ids, done_labels)[:-1] == taught(cut_ids, cut_labels)
    assert taught(done_ids, done_labels)[-1] in tiny.tokenizer.all_special_ids  # the end of turn
    assert not set(taught(cut_ids, cut_labels)) & set(tiny.tokenizer.all_special_ids)


def test_an_empty_response_is_taught_as_its_end_of_turn(tiny):
    """A policy may sample its stop token first (a SCoRe run on `equations` did, at step 64):
    the episode trains on that end of turn, in the context the policy had."""
    conv = [{"role": "user", "content": "Q"}]
    ((ids, labels, attempt),) = encode_turns(tiny.tokenizer, conv + [{"role": "assistant", "content": ""}])
    prompt = tiny.encode_prompts([conv])[0]
    assert ids[: len(prompt)] == prompt
    taught = [t for t, y in zip(ids, labels) if y != IGNORE]
    assert taught == [tiny.tokenizer.convert_tokens_to_ids("<|end|>")] and attempt.count(1) == 1


def test_truncation_is_recorded_and_counted(tiny):
    from selfevolve.evaluation.metrics import self_correction_metrics

    ask = [[{"role": "user", "content": "What is 12 + 30 - 7 + 4?"}]]
    (short,) = tiny.generate(ask, SamplingParams(max_new_tokens=2))[0]
    assert short.finish_reason == "length" and len(short.token_ids) == 2
    (full,) = tiny.generate([[{"role": "user", "content": "What is 1 + 1?"}]], SamplingParams(max_new_tokens=64))[0]
    assert full.finish_reason == "stop"
    m = self_correction_metrics([Trace(task=Task(id="a", prompt="p"), turns=[short, full])])
    assert m["truncated"] == 0.5


def test_rollouts_ignore_the_checkpoints_sampling_defaults(tmp_path):
    """A checkpoint that ships repetition_penalty=5 would otherwise bend every 'temperature 1'
    sample; with sampling_from_model=true it applies."""
    import shutil

    from selfevolve.models import resolve_model_path
    d = tmp_path / "m"
    shutil.copytree(resolve_model_path("tiny"), d)
    (d / "generation_config.json").write_text('{"repetition_penalty": 5.0, "eos_token_id": %d}' % HFPolicy(
        "tiny", device="cpu").model.generation_config.eos_token_id)
    conv = [[{"role": "user", "content": "What is 12 + 30?"}]]
    greedy = SamplingParams(max_new_tokens=24)
    plain = HFPolicy(str(d), device="cpu").generate(conv, greedy)[0][0].response
    assert plain == HFPolicy("tiny", device="cpu").generate(conv, greedy)[0][0].response
    bent = HFPolicy(str(d), device="cpu", sampling_from_model=True).generate(conv, greedy)[0][0].response
    assert bent != plain
