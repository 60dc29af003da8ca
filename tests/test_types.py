import pytest
from pydantic import ValidationError

from selfevolve.types import Feedback, Task, Trace, Turn, branching_graph


def make(scores, task_id="t"):
    return Trace(task=Task(id=task_id, prompt="What is 1 + 1?", reference="2"),
                 turns=[Turn(response=f"r{i}", feedback=Feedback(score=s)) for i, s in enumerate(scores)])


def test_task_rejects_unknown_and_missing_fields():
    with pytest.raises(ValidationError, match="prompt"):
        Task(id="x")
    with pytest.raises(ValidationError, match="extra"):
        Task(id="x", prompt="p", answer="2")


def test_correct_at_inherits_last_answer_after_early_stop():
    t = make([1.0])
    assert t.correct_at(1) and t.correct_at(2)
    t = make([0.0, 1.0])
    assert not t.correct_at(1) and t.correct_at(2)
    assert not Trace(task=Task(id="e", prompt="p")).correct_at(1)


def test_graph_is_a_chain_of_turns():
    t = make([0.0, 1.0, 1.0])
    g = t.graph()
    assert list(g.successors("task")) == ["turn1"]
    assert [g.nodes[n]["score"] for n in ("turn1", "turn2", "turn3")] == [0.0, 1.0, 1.0]
    assert g.number_of_edges() == 3


def test_branching_graph_links_children_to_parent():
    root = make([0.0])
    kids = [make([1.0]).model_copy(update={"parent_id": root.id}) for _ in range(3)]
    g = branching_graph([root, *kids])
    assert sorted(g.successors(root.id)) == sorted(k.id for k in kids)


def test_trace_json_round_trip():
    t = make([0.0, 1.0])
    assert Trace.model_validate_json(t.model_dump_json()) == t


def test_verdict_is_a_typed_field_and_old_traces_still_load():
    fb = Feedback(text="Looks right.", verdict="correct")
    assert fb.verdict == "correct" and "verdict" not in fb.details
    old = Feedback.model_validate({"text": "x", "source": "self", "details": {"verdict": "wrong",
                                                                              "critic_adapter": None}})
    assert old.verdict == "wrong" and old.details == {"critic_adapter": None}
    import pydantic
    import pytest

    with pytest.raises(pydantic.ValidationError):
        Feedback(verdict="revise")


def test_a_logged_conversation_is_the_context_it_is_trained_and_resampled_in(tmp_path):
    """Issue 42: a request's system message and earlier turns stay with its task, through the
    trace store, into what the recipes sample and train on (not its last user message alone)."""
    from types import SimpleNamespace

    from selfevolve.data.sources import logged_answers, logged_tasks, request_task
    from selfevolve.data.store import TraceStore
    from selfevolve.loop import conversation
    from selfevolve.training.learner import answer_message
    from selfevolve.types import Feedback, Trace, Turn, task_messages

    conv = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3 + 3?"}]
    req = SimpleNamespace(reference="6", tests=None, entry_point=None)
    store = TraceStore(tmp_path / "t.sqlite")
    store.append([Trace(task=request_task(conv, req), turns=[Turn(response="6", feedback=Feedback(score=1.0))])])
    store.close()
    (task,) = logged_tasks(str(tmp_path / "t.sqlite"))
    assert task.prompt == "And 3 + 3?" and task_messages(task) == conv
    ((plain, turn),) = logged_answers([task])
    assert [*task_messages(plain), answer_message(turn)][:-1] == conv  # ReST-EM / STaR's SFT row's context
    assert conversation(Trace(task=plain), [], system="ignored: it has its own") == conv
    assert task_messages(plain, "hinted")[-1] == {"role": "user", "content": "hinted"} and \
        task_messages(plain, "hinted")[:-1] == conv[:-1]
