"""LangChain: the SelfRefiner in a real LCEL chain; a real chat model (ChatOpenAI against
`selfevolve serve`) as the policy and as the judge."""

import asyncio

import pytest
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from selfevolve.data.store import TraceStore
from selfevolve.feedback import JudgeCritic
from selfevolve.langchain import LangChainPolicy, SelfRefiner, to_task
from selfevolve.serving.process import ServerProcess
from selfevolve.types import SamplingParams

GREEDY = SamplingParams(max_new_tokens=40)


def test_lcel_chain_invoke_batch_ainvoke(tiny, tmp_path):
    store = TraceStore(tmp_path / "t.sqlite")
    refiner = SelfRefiner(tiny, max_turns=2, sampling=GREEDY, store=store)
    chain = ChatPromptTemplate.from_template("What is {expr}?") | refiner | StrOutputParser()
    one = chain.invoke({"expr": "7 + 8 - 3"})
    assert isinstance(one, str) and one
    # the chain answers what the loop answers directly
    direct = refiner.invoke("What is 7 + 8 - 3?")
    assert one == direct.content and direct.response_metadata["turns"] == 2
    assert chain.batch([{"expr": "7 + 8 - 3"}, {"expr": "1 + 2"}])[0] == one
    assert asyncio.run(chain.ainvoke({"expr": "7 + 8 - 3"})) == one
    assert store.count() == 5 and store.get(direct.response_metadata["trace_id"]).final == one


def test_inputs_a_chain_can_send():
    assert to_task({"question": "q?", "answer": 3}).reference == "3"
    assert (
        to_task(ChatPromptTemplate.from_messages([("system", "be brief"), ("human", "{x}")]).invoke({"x": "hi"})).prompt
        == "hi"
    )
    with pytest.raises(TypeError):
        to_task(3.5)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    from langchain_openai import ChatOpenAI

    s = ServerProcess(f"traces={tmp_path_factory.mktemp('lc') / 't.sqlite'}")
    yield ChatOpenAI(base_url=s.url + "/v1", api_key="none", model="tiny", max_retries=0)
    s.stop()


def test_a_langchain_chat_model_as_policy_and_judge(chat_model, tiny):
    policy = LangChainPolicy(chat_model)
    out = policy.generate([[{"role": "user", "content": "What is 7 + 8 - 3?"}]], GREEDY)
    assert (out[0][0].response == tiny.generate([[{"role": "user", "content": "What is 7 + 8 - 3?"}]],
                                                GREEDY)[0][0].response)
    msg = SelfRefiner(tiny, critic=JudgeCritic(policy), max_turns=2, sampling=GREEDY).invoke("What is 3 + 4 - 1?")
    assert msg.content and msg.response_metadata["turns"] in (1, 2)
