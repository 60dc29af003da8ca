import os

import pytest

os.environ.setdefault("SELFEVOLVE_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a hub
# one cache (converted .gguf models) for this process and the CLI subprocesses (which get HOME=/tmp)
os.environ.setdefault("SELFEVOLVE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "selfevolve"))


@pytest.fixture(scope="session")
def tiny():
    """The bundled tiny model as an HFPolicy, loaded once per test session."""
    import torch

    from selfevolve.policies import HFPolicy

    torch.set_num_threads(2)
    return HFPolicy("tiny", device="cpu")


# --- the vllm tier: tests against a real vLLM (its CPU build here), in a virtualenv of its own ---

VLLM_PYTHON = os.environ.get("SELFEVOLVE_VLLM_PYTHON")
VLLM_HOW = ("vllm tier skipped: `bash bench/vllm-env.sh` makes .venv-vllm, then "
            "`SELFEVOLVE_VLLM_PYTHON=.venv-vllm/bin/python pytest -m vllm` runs it against a real vLLM server")


def pytest_collection_modifyitems(config, items):
    if VLLM_PYTHON:
        return
    skip = pytest.mark.skip(reason=VLLM_HOW)
    for item in items:
        if "vllm" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
    if not VLLM_PYTHON and any("vllm" in r.keywords for r in terminalreporter.stats.get("skipped", [])):
        terminalreporter.write_line(VLLM_HOW)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing test that used a vLLM server gets the end of that server's log in its report."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for name in ("vllm_server", "vllm_bf16_server"):
            server = item.funcargs.get(name) if hasattr(item, "funcargs") else None
            if server is not None:
                report.sections.append((f"{name} log ({server.log})", server.tail(60)))


def tiny_path() -> str:
    from selfevolve.models import resolve_model_path

    return str(resolve_model_path("tiny"))


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory):
    """One real `vllm serve` of tiny (fp32, runtime LoRA) for the whole session, stopped at the end."""
    from selfevolve.serving.process import VLLMServerProcess

    log = tmp_path_factory.mktemp("vllm") / "server.log"
    with VLLMServerProcess(VLLM_PYTHON, tiny_path(), str(log)) as server:
        yield server


@pytest.fixture
def vllm_bf16_server(tmp_path_factory):
    """The same in bfloat16 (this CPU's AVX512-BF16 kernels), for one test: stopped after it."""
    from selfevolve.serving.process import VLLMServerProcess

    log = tmp_path_factory.mktemp("vllm-bf16") / "server.log"
    with VLLMServerProcess(VLLM_PYTHON, tiny_path(), str(log), dtype="bfloat16") as server:
        yield server
