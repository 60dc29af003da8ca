"""The `>>>` examples in docstrings are part of the documentation; they must run."""

import doctest
import importlib

import pytest

from tests.test_layers import modules

MODULES = sorted(name for name, path in modules().items() if ">>>" in path.read_text())  # every module with one


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


def test_readme_python_examples_run(tmp_path, monkeypatch):
    """Every ```python block of the README runs; the HTTP one against a real `selfevolve serve`."""
    import re
    from pathlib import Path

    from selfevolve.serving.process import ServerProcess

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)
    server = None
    try:
        for code in blocks:
            if "127.0.0.1:8000" in code:
                server = ServerProcess(f"traces={tmp_path / 't.sqlite'}")
                code = code.replace("127.0.0.1:8000", f"127.0.0.1:{server.port}")
            exec(compile(code, "README.md", "exec"), {})
    finally:
        if server:
            server.stop()
