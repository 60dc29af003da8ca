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
