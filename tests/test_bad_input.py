"""Bad input never costs work: every command rejects it with one line on stderr, exit code
2 and no traceback, and leaves what was on disk as it was (issue 8, point 6)."""

import json
import resource
import signal
import subprocess

import pytest

from selfevolve.cli import main
from selfevolve.data.store import TraceStore
from tests.recipes.test_score import SMALL
from tests.test_cli import EXE, cli


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Files a user might point at by mistake, made once."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from selfevolve.config import build
    from selfevolve.recipes.rest_em import RestEMConfig
    from selfevolve.run import Run

    d = tmp_path_factory.mktemp("bad")
    (d / "empty.jsonl").write_text("")
    (d / "broken.jsonl").write_text('{"prompt": "What is 1 + 1?", "answer": "2"}\n{"prompt": oops}\n')
    (d / "noprompt.jsonl").write_text('{"question": "What is 1 + 1?", "answer": "2"}\n')
    (d / "plain_dir").mkdir()
    (d / "gym.jsonl").write_text('{"question": "What is 1 + 1?", "answer": "2", "uid": "a"}\n'
                                 '{"question": "What is 2 + 2?", "answer": "4", "uid": "b"}\n'
                                 '{"question": "What is 2 + 1?", "answer": "3", "uid": "a"}\n')
    (d / "bad.yaml").write_text("lr: 1e-4\nlearning_rate: 3\n")
    (d / "notyaml.yaml").write_text("lr: [1,\n")
    Run(build(RestEMConfig, {"recipe": "rest_em", "run_dir": str(d / "rest_em_run"), "iterations": 2}))
    torch.manual_seed(0)
    other = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, vocab_size=100, max_position_embeddings=64))
    get_peft_model(other, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(d / "other_adapter")
    return d


CASES = [  # (args with {d} for the fixture directory, words the one line must contain)
    (["eval", "limt=3"], "did you mean 'limit'"),  # unknown key
    (["run", "recipe=score", "stage1_step=2"], "did you mean 'stage1_steps'"),  # unknown recipe key
    (["eval", "limit=three"], "limit"),  # wrong type
    (["run", "recipe=spin", "lr=-1"], "lr"),  # out of range
    (["eval", "limit"], "expected key=value"),  # not key=value
    (["frobnicate"], "unknown command"),
    (["eval", "data=arith", "difficulty=1", "limit=50"], "distinct test tasks, not 50"),  # more tasks than exist
    (["serve", "run_dir=x"], "unknown key 'run_dir'"),  # a key the command would ignore
    (["serve", "host=0.0.0.0"], "without an api_key"),  # open to the network, unauthenticated
    (["serve", "adapter_root={d}/nowhere"], "is not a directory"),
    (["run", "recipe=scoree"], "did you mean 'score'"),
    (["run"], "recipe=NAME"),
    (["eval", "model=/nonexistent/model"], "no such directory"),  # missing path
    (["eval", "model={d}/plain_dir"], "not a model directory"),  # not a model
    (["eval", "data=/nonexistent.jsonl"], "no such file"),
    (["eval", "data={d}/broken.jsonl"], "broken.jsonl:line 2: malformed JSON"),  # names the line
    (["eval", "data={d}/empty.jsonl"], "empty"),
    (["eval", "data={d}/noprompt.jsonl"], "prompt"),  # missing field
    (["eval", "data={d}/plain_dir"], "not a saved datasets directory"),
    (["check", "data={d}/gym.jsonl", "prompt_field=question", "id_field=id_"],
     "gym.jsonl:line 1: no field 'id_' (id_field=; fields here: ['answer', 'question', 'uid'])"),
    (["check", "data={d}/gym.jsonl", "prompt_field=question", "answer_field=gold"],
     "no field 'gold' (answer_field=; fields here: ['answer', 'question', 'uid'])"),
    (["check", "data={d}/gym.jsonl", "prompt_field=question", "tests_field=test_list"], "no field 'test_list'"),
    (["check", "data={d}/gym.jsonl", "prompt_field=question", "id_field=uid"],
     "task id 'a' is repeated (line 1 and line 3)"),
    (["eval", "verifier=nope"], "unknown verifier"),
    (["eval", "limit=1", "adapter={d}/other_adapter"], "another base model"),  # adapter for another model
    (["eval", "limit=1", "adapter={d}/plain_dir"], "not a peft adapter"),
    (["eval", "out=/nonexistent/dir/m.json", "limit=1"], "does not exist"),
    (["run", "recipe=score", "config={d}/bad.yaml"], "unknown key 'learning_rate'"),
    (["run", "recipe=score", "config={d}/notyaml.yaml"], "not valid YAML"),
    (["run", "recipe=score", "config={d}/missing.yaml"], "config file not found"),
    (["run", "recipe=score", "run_dir={d}/rest_em_run", "resume=true"], "holds a 'rest_em' run"),  # another recipe
    (["run", "recipe=rest_em", "run_dir={d}/rest_em_run"], "already holds a run"),  # no overwrite
    (["run", "recipe=rest_em", "run_dir={d}/rest_em_run", "nproc=2"], "already holds a run"),  # before torchrun
    (["run", "recipe=rest_em", "run_dir={d}/rest_em_run", "resume=true"], "different config: iterations=3"),
    (["run", "recipe=rest_em", "run_dir={d}/plain_dir", "resume=true"], "holds no run"),
    (["run", "recipe=score", "logger=neptune"], "unknown logger"),
    (["traces", "{d}/nowhere"], "no traces.sqlite"),
    (["report", "{d}/plain_dir"], "not a run directory"),
    (["serve", "port=abc"], "port"),
    (["refine", "prompt=x", "critic=oracle"], "critic"),
    (["refine", "prompt=x", "critic=judge"], "judge="),
]


@pytest.mark.parametrize("args,words", CASES, ids=[" ".join(a)[:60] for a, _ in CASES])
def test_bad_input_is_one_line_and_exit_2(world, args, words, capfd):
    """In-process through `selfevolve.cli.main` (the console script's body) to keep the table
    fast; a traceback would surface here as the test's own exception. The subprocess path
    is covered by the cases below and by tests/test_cli.py."""
    before = sorted(p.relative_to(world) for p in world.rglob("*"))
    code = main([a.format(d=world) for a in args])
    err = capfd.readouterr().err
    assert code == 2, err
    assert words in err
    assert len(err.strip().splitlines()) == 1, err
    assert sorted(p.relative_to(world) for p in world.rglob("*")) == before  # nothing written or removed


@pytest.mark.parametrize(
    "args,words",
    [(["eval", "limt=3"], "did you mean 'limit'"), (["eval", "data={d}/broken.jsonl"], "line 2: malformed JSON")],
)
def test_bad_input_through_the_console_script(world, args, words):
    r = cli(*[a.format(d=world) for a in args])
    assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_debug_shows_the_traceback():
    r = cli("eval", "limt=3", "debug=true")
    assert r.returncode != 0 and "Traceback" in r.stderr


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    d = tmp_path_factory.mktemp("whole") / "run"
    assert cli("run", *SMALL, f"run_dir={d}").returncode == 0
    return d


@pytest.mark.parametrize("limit", [140_000, 300_000])
def test_disk_full_is_one_line_and_the_run_resumes(tmp_path, limit, whole):
    """A file-size limit makes the writes of a run fail as on a full disk (the trace store at
    140 kB, the checkpoint at 300 kB). The store stays readable; freeing the space and
    resuming ends the run as if nothing happened."""

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    cut = tmp_path / "cut"
    r = subprocess.run([EXE, "run", *SMALL, f"run_dir={cut}"], preexec_fn=small_disk, capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "SELFEVOLVE_QUIET": "1", "HOME": "/tmp"}, timeout=600)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "disk full?" in err[-1] and "resume=true" in err[-1] and "Traceback" not in r.stderr
    assert not list(cut.rglob("*.tmp"))
    n = TraceStore(cut / "traces.sqlite").count()
    [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert cli("traces", str(cut)).returncode == 0
    assert cli("run", *SMALL, f"run_dir={cut}", "resume=true").returncode == 0
    assert json.loads((cut / "summary.json").read_text()) == json.loads((whole / "summary.json").read_text())
    assert TraceStore(cut / "traces.sqlite").count() == TraceStore(whole / "traces.sqlite").count() >= n
