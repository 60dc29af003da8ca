"""The sandbox's zygote as a module: its pieces run in-process here (the sandbox runs the same
file with `python -I -c` inside the isolation; tests/verifiers/test_code.py covers that)."""

import os

import pytest

from selfevolve.verifiers import zygote


def _report(job) -> list[list[str]]:
    r, w = os.pipe()
    zygote.run_job(job, "NONCE", w)
    os.close(w)
    with os.fdopen(r) as f:
        return [line.rstrip("\n").split("\t") for line in f]


def test_plain_data_only():
    assert zygote.plain([1, 2.5, "a", b"b", None, {"k": (1, frozenset({2}))}])
    assert not zygote.plain(object()) and not zygote.plain([1, [2, [3, type]]])


def test_guard_refuses_a_rigged_return_value():
    class AlwaysEqual:
        def __eq__(self, other):
            return True

    assert zygote.guard(lambda: [1, 2])() == [1, 2]
    with pytest.raises(TypeError, match="not plain data"):
        zygote.guard(lambda: AlwaysEqual())()


def test_run_job_reports_each_assert_with_the_nonce():
    lines = _report({"program": "def f(x):\n    return x + 1\n", "tests": ["assert f(1) == 2", "assert f(2) == 4"],
                     "style": "asserts", "entry_point": "f"})
    assert [x[:4] for x in lines] == [["NONCE", "test", "0", "1"], ["NONCE", "test", "1", "0"], ["NONCE", "done", "2",
                                                                                                 "0"]]
    assert "AssertionError" in lines[1][4]


def test_run_job_humaneval_style_and_a_program_that_does_not_load():
    tests = "def check(candidate):\n    assert candidate(2) == 4\n    assert candidate(3) == 9\n"
    ok = _report({"program": "def sq(x):\n    return x * x\n", "tests": tests, "style": "humaneval",
                  "entry_point": "sq"})
    assert ok[-1][:4] == ["NONCE", "done", "2", "1"]
    broken = _report({"program": "def sq(x) return x", "tests": tests, "style": "humaneval", "entry_point": "sq"})
    assert broken[0][1:4] == ["load", "0", "0"] and "SyntaxError" in broken[0][4]


def test_wipe_empties_a_directory_a_program_made_read_only(tmp_path):
    d = tmp_path / "job" / "deep"
    d.mkdir(parents=True)
    (d / "f").write_text("x")
    os.chmod(d, 0o500)
    zygote.wipe(str(tmp_path))
    assert list(tmp_path.iterdir()) == []
