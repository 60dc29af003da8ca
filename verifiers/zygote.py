"""The sandbox's zygote: a long-lived server, started once inside the isolation, that forks a
fresh child per untrusted program (see sandbox.py for the isolation around it).

`Sandbox` reads this file as text and runs it with `python -I -c`, so the zygote needs no
import of selfevolve (whose files are masked inside the sandbox) and only the standard
library. Importing it runs nothing, which is what lets tests exercise `run_job` directly.

Protocol: one JSON request per line on stdin ({"job", "nonce", "timeout", "limits", "env"}),
one JSON reply per line on stdout ({"results", "timed_out", "returncode", "output",
"seconds"}). The child reports over a private pipe, one line per test, each starting with
the nonce the parent chose for this program, so a program cannot forge results.

The builtins it relies on are bound at import, before any program runs: a program may
replace `exec` or `type` in its own globals, never these names.
"""

import ast
import contextlib
import ctypes
import json
import os
import resource
import select
import signal
import sys
import time
import traceback
import types

_write, _compile, _exec, _type, _settrace, _setprofile = os.write, compile, exec, type, sys.settrace, sys.setprofile
_FunctionType, _BaseException, _str, _isinstance, _any = types.FunctionType, BaseException, str, isinstance, any
_PLAIN = (int, float, complex, str, bytes, bool, type(None), list, tuple, dict, set, frozenset)
PR_SET_DUMPABLE = 4

SCRATCH = os.getcwd()  # the zygote's working directory, wiped after every program
IN_NS = False          # PID 1 of its own namespace: it may kill every other process in it


def plain(x, depth: int = 0) -> bool:
    """Is `x` plain data (numbers, strings, containers of them), nothing with behaviour?"""
    t = _type(x)
    if t not in _PLAIN or depth > 20:
        return False
    if t is dict:
        return all(plain(k, depth + 1) and plain(v, depth + 1) for k, v in x.items())
    if t in (list, tuple, set, frozenset):
        return all(plain(v, depth + 1) for v in x)
    return True


def guard(fn):
    """Wrap a solution's function so it may return plain data only: an object with a
    rigged `__eq__` cannot pass a test's comparison."""
    def guarded(*a, **k):
        r = fn(*a, **k)
        if not plain(r):
            raise TypeError("returned a %s, not plain data" % _type(r).__name__)
        return r
    guarded.__name__ = fn.__name__
    return guarded


def _tail() -> str:
    return "".join(traceback.format_exc().splitlines(True)[-6:])


def run_job(job: dict, nonce: str, fd: int) -> None:
    """Run one program against its tests in this process; write a line per test to `fd`.
    `job`: {"program", "tests", "style": "humaneval"|"asserts", "entry_point"}."""
    def emit(kind, i, ok, msg=""):
        line = (
            nonce
            + "\t"
            + kind
            + "\t"
            + _str(i)
            + "\t"
            + ("1" if ok else "0")
            + "\t"
            + msg.replace("\n", "\\n")[-600:]
            + "\n"
        )
        _write(fd, line.encode("utf-8", "replace"))

    g = {"__name__": "__sandbox__", "__builtins__": __builtins__}
    try:
        _exec(_compile(job["program"], "<solution>", "exec"), g)
    except _BaseException:
        emit("load", 0, False, _tail())
        return
    _settrace(None)
    _setprofile(None)
    for k, v in list(g.items()):
        if _type(v) is _FunctionType and v.__code__.co_filename == "<solution>":
            g[k] = guard(v)
    if job["style"] == "humaneval":
        check = None
        for node in ast.parse(job["tests"]).body:
            if _isinstance(node, ast.FunctionDef) and node.name == "check":
                check = node
            else:
                _exec(_compile(ast.Module([node], []), "<tests>", "exec"), g)
        if check is None or job["entry_point"] not in g:
            emit("load", 0, False,
                 "no check() in the tests" if check is None else "no function %r defined" % job["entry_point"])
            return
        g[check.args.args[0].arg if check.args.args else "candidate"] = g[job["entry_point"]]
        tests = [ast.Module([s], []) for s in check.body]
        is_test = [_any(_isinstance(n, ast.Assert) for n in ast.walk(s)) for s in check.body]
        if not _any(is_test):
            is_test[-1] = True
    else:
        tests = [ast.parse(t) for t in job["tests"]]
        is_test = [True] * len(tests)
    all_ok, n = True, 0
    for node, counts in zip(tests, is_test):
        try:
            _settrace(None)
            _setprofile(None)
            _exec(_compile(node, "<tests>", "exec"), g)
            ok, msg = True, ""
        except _BaseException:
            ok, msg = False, _tail()
        if counts or not ok:
            emit("test", n, ok, msg if not ok else ast.unparse(node)[:200])
            n += 1
        all_ok = all_ok and ok
    emit("done", n, all_ok)


def _child(req: dict, w: int) -> None:
    """In the forked child: own session, scratch directory, limits, scrubbed environment."""
    os.setsid()
    os.chdir(os.path.join(SCRATCH, "job"))
    out = os.open(".out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(out)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    lim = req["limits"]
    for name, value in (
        ("RLIMIT_CPU", lim["cpu"]),
        ("RLIMIT_AS", lim["memory"]),
        ("RLIMIT_FSIZE", lim["fsize"]),
        ("RLIMIT_NOFILE", lim["nofile"]),
        ("RLIMIT_NPROC", lim["nproc"]),
        ("RLIMIT_CORE", 0),
    ):
        resource.setrlimit(getattr(resource, name), (value, value))
    os.environ.clear()
    os.environ.update(req["env"])
    os.environ["HOME"] = os.getcwd()
    run_job(req["job"], req["nonce"], w)


def _kill_all(pid: int) -> None:
    """Kill the program and everything it started, and reap them. (A hot loop after a fork
    bomb: plain try/except, not contextlib.suppress, which costs a context manager per kill.)"""
    for _ in range(10000):
        if IN_NS:
            others = [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != 1]
            for p in others:
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    continue
        else:
            others = []
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            if not IN_NS:
                return
        if IN_NS and not others:
            return
        time.sleep(0.001)


def wipe(scratch: str) -> None:
    """Empty `scratch`, whatever a program left there (read-only directories included);
    what cannot be removed is left, and the next program's fresh `job/` is still new."""
    for name in os.listdir(scratch):
        p = os.path.join(scratch, name)
        for root, dirs, files in os.walk(p, topdown=False):
            for f in files:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(root, f))
            for d in dirs:
                with contextlib.suppress(OSError):
                    os.chmod(os.path.join(root, d), 0o700)
                    os.rmdir(os.path.join(root, d))
        with contextlib.suppress(OSError):
            if os.path.isdir(p) and not os.path.islink(p):
                os.rmdir(p)
            else:
                os.unlink(p)


def _read_available(r: int, chunks: list, size: int) -> None:
    """Whatever the pipe still holds, into `chunks` (up to 1 MiB in all, `size` so far)."""
    os.set_blocking(r, False)
    with contextlib.suppress(BlockingIOError, OSError):
        while data := os.read(r, 65536):
            if size < 1 << 20:
                chunks.append(data)
                size += len(data)


def serve_one(req: dict) -> dict:
    """Fork a child for one program, collect its report within the timeout, kill what it left."""
    wipe(SCRATCH)
    os.mkdir(os.path.join(SCRATCH, "job"))
    r, w = os.pipe()
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            _child(req, w)
        finally:
            os._exit(0)
    os.close(w)
    chunks, size, status, eof, timed_out = [], 0, None, False, False
    deadline = t0 + req["timeout"]
    while status is None:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        if not eof and select.select([r], [], [], min(left, 0.01))[0]:
            data = os.read(r, 65536)
            eof = not data
            if data and size < 1 << 20:
                chunks.append(data)
                size += len(data)
        elif eof:
            time.sleep(0.0005)
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            status = st
    _kill_all(pid)
    _read_available(r, chunks, size)
    os.close(r)
    try:
        with open(os.path.join(SCRATCH, "job", ".out"), "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 2000))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        tail = ""
    wipe(SCRATCH)
    return {"results": b"".join(chunks).decode("utf-8", "replace"), "timed_out": timed_out,
            "returncode": None if status is None else os.waitstatus_to_exitcode(status), "output": tail,
            "seconds": time.monotonic() - t0}


def main() -> None:
    global SCRATCH, IN_NS
    ctypes.CDLL(None).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)  # no ptrace, no /proc/1/mem
    SCRATCH, IN_NS = os.getcwd(), os.getpid() == 1
    for line in sys.stdin.buffer:
        sys.stdout.write(json.dumps(serve_one(json.loads(line))) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
