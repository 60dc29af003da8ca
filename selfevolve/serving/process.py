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


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float, poll: float) -> bool:
    """Poll `url`/health until it answers 200 (True), the process exits or `timeout` seconds
    pass (False)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(poll)
    return False


class ServerProcess:
    """`selfevolve serve port=<free> threads=2 ARGS...` in a subprocess; returns once
    /health answers (or raises with the server's output if it exits or takes over
    `start_timeout` seconds). `port`: that port instead (a server restarted where it was)."""

    def __init__(self, *args: str, start_timeout: float = 120.0, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "selfevolve.cli", "serve", f"port={self.port}",
                                      "threads=2", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if wait_healthy(self.proc, self.url, start_timeout, 0.2):
            return
        if self.proc.poll() is not None:
            raise RuntimeError(f"selfevolve serve exited: {self.proc.stdout.read()}")
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


class VLLMServerProcess:
    """A real `vllm serve` (vLLM's OpenAI-compatible server, `python -m
    vllm.entrypoints.openai.api_server`) on a free loopback port, with runtime LoRA loading:
    what the `vllm` test tier and the benchmarks start. `python` is the interpreter of a
    virtualenv that has vLLM (`bench/vllm-env.sh`); `model` a local directory. Its output goes
    to `log` (vLLM writes a lot); `tail()` shows the end of it. Returns once /health answers,
    else raises with that tail (start-up takes 20–40 s for tiny on 2 CPU cores, longer beside
    other work)."""

    def __init__(self, python: str, model: str, log: str, dtype: str = "float32", max_lora_rank: int = 16,
                 max_loras: int = 4, start_timeout: float = 600.0, port: int | None = None, extra: tuple = ()):
        import os

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = dict(os.environ, VLLM_ALLOW_RUNTIME_LORA_UPDATING="True", VLLM_CPU_KVCACHE_SPACE="1",
                   VLLM_LOGGING_LEVEL=os.environ.get("VLLM_LOGGING_LEVEL", "INFO"))
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host", "127.0.0.1",
                 "--port", str(self.port), "--dtype", dtype, "--enable-lora", "--max-lora-rank", str(max_lora_rank),
                 "--max-loras", str(max_loras), "--max-model-len", "256", "--seed", "0",
                 "--scheduling-policy", "priority", *extra],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        if wait_healthy(self.proc, self.url, start_timeout, 1.0):
            return
        if self.proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited ({self.proc.returncode}):\n{self.tail()}")
        self.stop()
        raise RuntimeError(f"vllm serve did not come up in {start_timeout:.0f} s:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        with open(self.log, errors="replace") as f:
            return "".join(f.readlines()[-lines:])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM to the server's process group (vLLM's engine core is a child), SIGKILL after 20 s."""
        import os
        import signal

        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass

    def __enter__(self) -> VLLMServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
