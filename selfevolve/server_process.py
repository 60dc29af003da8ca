"""Start `selfevolve serve` as a separate process on a free loopback port and stop it: what
the tests, the benchmarks and a local rollout fleet use instead of copying these lines.

    with ServerProcess("model=tiny") as server:
        OpenAIPolicy(base_url=server.url)

It runs the current interpreter (`python -m selfevolve.cli`), so it works the same in a
virtualenv, a system install or CI, whatever is on PATH.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`selfevolve serve port=<free> threads=2 ARGS...` in a subprocess; returns once
    /health answers (or raises with the server's output if it exits or takes over
    `start_timeout` seconds). `port`: that port instead (a server restarted where it was)."""

    def __init__(self, *args: str, start_timeout: float = 120.0, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "selfevolve.cli", "serve", f"port={self.port}",
                                      "threads=2", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + start_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"selfevolve serve exited: {self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"selfevolve serve did not come up in {start_timeout:.0f} s")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
