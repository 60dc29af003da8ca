"""The real console entry point, in a subprocess, as a user runs it."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def script(name: str) -> str | None:
    """A console script of the interpreter running the tests (a virtualenv's, even one not
    activated), else whatever PATH has."""
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else shutil.which(name)


EXE = script("selfevolve")


def cli(*args, cwd=None, env=None):
    assert EXE, "the selfevolve console script is not installed"
    passed = {k: v for k, v in os.environ.items() if k.startswith(("PYTHON", "VIRTUAL", "SELFEVOLVE_CACHE"))}
    env = {"PATH": "/usr/bin:/bin", "SELFEVOLVE_QUIET": "1", "HOME": "/tmp", **passed, **(env or {})}
    return subprocess.run([EXE, *args], capture_output=True, text=True, cwd=cwd, timeout=600, env=env)


@pytest.mark.parametrize("args", [["--help"], ["run", "recipe=pretrain", "--help"], ["eval", "--help"],
                                  ["refine", "--help"], ["check", "--help"], ["serve", "--help"], ["recipes"],
                                  ["run", "recipe=score", "--help"], ["run", "recipe=star", "--help"],
                                  ["run", "recipe=spin", "--help"], ["run", "recipe=self_evolve", "--help"]])
def test_help_everywhere(args):
    r = cli(*args)
    assert r.returncode == 0 and r.stdout.strip()


def test_recipes_lists_pretrain():
    assert "pretrain" in cli("recipes").stdout


def test_eval_writes_the_protocol(tmp_path):
    """The issue's command, as written: intervals, p_flip, maj@k / pass@k with their budget, feedback."""
    out = tmp_path / "m.json"
    r = cli("eval", "model=tiny", "data=arith", "limit=300", "max_turns=2", f"out={out}")
    assert r.returncode == 0, r.stderr
    m = json.loads(out.read_text())
    assert {"acc_t1", "acc_t2", "delta", "delta_i2c", "delta_c2i", "edit_ratio", "truncated", "n"} <= set(m)
    assert m["n"] == 300 and m["split"] == "test" and m["feedback"] == "intrinsic" and 0 < m["p_flip"] <= 1
    for k in ("acc_t1", "acc_t2", "delta", "delta_i2c", "delta_c2i", "edit_ratio", "maj_at_k", "pass_at_k"):
        lo, hi = m["intervals"][k]
        assert lo <= m[k] <= hi and hi - lo < 0.3, k
    b = m["budget"]
    assert b["k"] == 2 and b["maj_at_k"]["samples"] == b["pass_at_k"]["samples"] == b["refine"]["samples"] == 600
    assert b["maj_at_k"]["tokens"] > 0 and b["refine"]["tokens"] > 0
    assert "acc_t1" in r.stdout and "maj@2" in r.stdout and "feedback: intrinsic" in r.stdout


def test_eval_labels_oracle_feedback(tmp_path):
    out = tmp_path / "m.json"
    r = cli("eval", "model=tiny", "data=arith", "limit=8", "critic=verifier", f"out={out}")
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["feedback"] == "oracle" and "feedback: oracle" in r.stdout


def test_refine_prints_answer_and_json():
    r = cli("refine", "prompt=What is 12 + 30?", "max_turns=2", "max_new_tokens=40")
    assert r.returncode == 0 and r.stdout.strip()
    r = cli("refine", "prompt=What is 12 + 30?", "reference=42", "json=true", "max_new_tokens=40")
    trace = json.loads(r.stdout)
    assert trace["task"]["reference"] == "42" and trace["turns"][0]["feedback"]["score"] in (0.0, 1.0)


def test_user_dataset_with_renamed_fields(tmp_path):
    p = tmp_path / "mine.jsonl"
    p.write_text("".join(json.dumps({"q": f"What is {a} + 10?", "a": str(a + 10)}) + "\n" for a in range(10, 14)))
    r = cli("eval", f"data={p}", "prompt_field=q", "answer_field=a", "max_turns=1", f"out={tmp_path / 'o.json'}")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "o.json").read_text())["n"] == 4


def test_debug_shows_the_traceback():
    r = cli("eval", "limt=3", "debug=true")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_eval_with_an_adapter(tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from selfevolve.policies import resolve_model_path

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny")),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    base, tuned = tmp_path / "base.json", tmp_path / "tuned.json"
    assert cli("eval", "limit=16", "max_turns=1", f"out={base}").returncode == 0
    r = cli("eval", "limit=16", "max_turns=1", f"adapter={tmp_path / 'adapter'}", f"out={tuned}")
    assert r.returncode == 0, r.stderr
    assert json.loads(tuned.read_text())["n"] == 16
    bad = cli("eval", "limit=1", f"adapter={tmp_path}")
    assert bad.returncode == 2 and "not a peft adapter" in bad.stderr


def test_check_humaneval_all_pass(tmp_path):
    out = tmp_path / "check.json"
    r = cli("check", "data=humaneval", "verifier=code", f"out={out}")
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    assert (result["passed"], result["total"], result["failures"]) == (164, 164, [])


def test_check_reports_failures(tmp_path):
    p = tmp_path / "tasks.jsonl"
    p.write_text(json.dumps({"prompt": "What is 2 + 2?", "answer": "4"}) + "\n"
                 + json.dumps({"prompt": "What is 2 + 3?", "answer": ""}) + "\n")
    out = tmp_path / "check.json"
    r = cli("check", f"data={p}", "verifier=math", f"out={out}")
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    assert result["passed"] == 1 and result["total"] == 2 and result["failures"][0]["task_id"].endswith("2")
    assert "cannot parse the reference" in result["failures"][0]["text"]


def test_refine_with_a_verifier_critic_prints_the_critiques():
    r = cli("refine", "prompt=What is 7 + 8 - 3 + 4?", "reference=16", "critic=verifier", "max_turns=3", "json=true")
    assert r.returncode == 0, r.stderr
    trace = json.loads(r.stdout)
    critiques = [t["critique"] for t in trace["turns"] if t["critique"]]
    assert all(c["source"] == "verifier" for c in critiques)
    assert all("16" not in c["text"] for c in critiques if c["verdict"] == "wrong")


@pytest.mark.parametrize("args,words", [(["serve", "port=abc"], "port"), (["serve", "model=/nonexistent"], "model="),
                                        (["refine", "prompt=x", "critic=oracle"], "critic"),
                                        (["refine", "prompt=x", "critic=judge"], "judge=")])
def test_serve_and_critic_bad_input(args, words):
    r = cli(*args)
    assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr
