"""HFPolicy on the real bundled model and on a randomly initialised model of another
architecture (Llama, ChatML template) saved to disk, as a user's model directory would be."""

import pytest
import torch

from selfevolve.errors import UserError
from selfevolve.policies import HFPolicy, resolve_model_path
from selfevolve.training.learner import encode_chat
from selfevolve.types import SamplingParams

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def convs(*prompts):
    return [[{"role": "user", "content": p}] for p in prompts]


PROMPTS = ["What is 12 + 30?", "What is 47 + 38 - 12?", "What is 99 - 10 + 23 - 45?", "Hi", "What is 10 + 10?"]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("llama")
    tok = AutoTokenizer.from_pretrained(resolve_model_path("tiny"))
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token, tok.chat_template = "<|im_end|>", CHATML
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_bundled_model_loads_with_auto_classes():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path("tiny")
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == "llama"  # what vLLM serves with LoRA
    assert sum(f.stat().st_size for f in path.glob("*.safetensors")) <= 20 * 2**20
    text = "naïve café 日本語 🚀 \x00 tab\t"
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level: nothing is unknown
    assert tok.unk_token_id is None or tok.unk_token_id not in tok(text)["input_ids"]


def test_batched_greedy_equals_one_at_a_time(tiny):
    s = SamplingParams(max_new_tokens=40)
    batched = [t[0].response for t in tiny.generate(convs(*PROMPTS), s)]
    single = [tiny.generate(convs(p), s)[0][0].response for p in PROMPTS]
    assert batched == single
    assert any("The answer is" in r for r in batched)


def test_sampling_n_seed_and_logprobs(tiny):
    s = SamplingParams(temperature=1.0, n=4, seed=7, max_new_tokens=30, logprobs=True)
    a = tiny.generate(convs(*PROMPTS[:2]), s)
    b = tiny.generate(convs(*PROMPTS[:2]), s)
    assert [len(x) for x in a] == [4, 4]
    assert [[t.response for t in x] for x in a] == [[t.response for t in x] for x in b]
    c = tiny.generate(convs(*PROMPTS[:2]), s.model_copy(update={"seed": 8}))
    assert [[t.response for t in x] for x in a] != [[t.response for t in x] for x in c]
    t = a[0][0]
    assert len(t.logprobs) == len(t.token_ids) and all(lp <= 0 for lp in t.logprobs)


def test_logprobs_of_generated_text_match_scoring(tiny):
    s = SamplingParams(temperature=1.0, seed=1, max_new_tokens=30, logprobs=True)
    conv = convs(PROMPTS[1])[0]
    t = tiny.generate([conv], s)[0][0]
    scored = tiny.logprobs([conv + [{"role": "assistant", "content": t.response}]])[0]
    # the scored message also contains the end token; the generated one stops before it
    assert scored <= sum(t.logprobs) + 1e-3
    assert scored == pytest.approx(sum(t.logprobs), abs=5.0)


def make_adapter(tiny, path, seed):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(tiny.path)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(path)
    return path


def test_several_adapters_switch_by_name(tmp_path):
    policy = HFPolicy("tiny", device="cpu")
    conv = [convs(PROMPTS[1])[0] + [{"role": "assistant", "content": "The answer is 73."}]]
    base = policy.logprobs(conv)[0]
    a = make_adapter(policy, tmp_path / "a", 1)
    b = make_adapter(policy, tmp_path / "b", 2)
    policy.load_adapter(str(a), "a")
    assert policy.active_adapter == "a"
    lp_a = policy.logprobs(conv)[0]
    policy.load_adapter(str(b), "b")
    assert policy.active_adapter == "b"
    lp_b = policy.logprobs(conv)[0]
    assert len({round(base, 4), round(lp_a, 4), round(lp_b, 4)}) == 3
    policy.set_adapter("a")
    assert policy.logprobs(conv)[0] == pytest.approx(lp_a, abs=1e-5)
    policy.set_adapter(None)
    assert policy.active_adapter is None and policy.logprobs(conv)[0] == pytest.approx(base, abs=1e-5)
    policy.load_adapter(str(b), "a")  # a new version of adapter "a"
    assert policy.logprobs(conv)[0] == pytest.approx(lp_b, abs=1e-5)
    with pytest.raises(UserError, match="not loaded"):
        policy.set_adapter("c")
    with pytest.raises(UserError, match="not a peft adapter"):
        policy.load_adapter(str(tmp_path), "c")


def test_other_architecture_with_its_own_chat_template(llama_dir):
    policy = HFPolicy(str(llama_dir), device="cpu", batch_size=2)
    assert policy.model.config.model_type == "llama"
    s = SamplingParams(max_new_tokens=12)
    batched = [t[0].response for t in policy.generate(convs(*PROMPTS), s)]
    single = [policy.generate(convs(p), s)[0][0].response for p in PROMPTS]
    assert batched == single and len(batched) == len(PROMPTS)
    ids, labels = encode_chat(policy.tokenizer, convs("hi")[0] + [{"role": "assistant", "content": "hello"}])
    learned = policy.tokenizer.decode([t for t in labels if t != -100])
    assert learned == "hello<|im_end|>"  # ChatML's newline after the stop token is the template's, not learned


def test_bad_model_paths(tmp_path):
    with pytest.raises(UserError, match="no such directory"):
        HFPolicy(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="not a model directory"):
        HFPolicy(str(tmp_path))
    with pytest.raises(UserError, match="CUDA is not available"):
        if torch.cuda.is_available():
            raise UserError("CUDA is not available (skipped: a GPU is present)")
        HFPolicy("tiny", device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda():
    policy = HFPolicy("tiny", device="cuda")
    assert policy.device.type == "cuda"
    assert policy.generate(convs("What is 12 + 30?"), SamplingParams(max_new_tokens=10))[0][0].response


def test_stop_strings_end_the_answer(tiny):
    """`stop` cuts each answer before the first stop string, as OpenAI and vLLM do."""
    from selfevolve.data import arith
    from selfevolve.types import SamplingParams

    convs = [[{"role": "user", "content": t.prompt}] for t in arith.tasks("validation", 8, seed=0)]
    whole = tiny.generate(convs, SamplingParams(max_new_tokens=64))
    cut = tiny.generate(convs, SamplingParams(max_new_tokens=64, stop=["answer"]))
    for (w,), (c,) in zip(whole, cut):
        assert c.response == w.response.split("answer")[0] and c.finish_reason == "stop"
