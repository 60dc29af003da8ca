"""Where a model comes from: `tiny` or `tiny-look` (the bundled models), a local Hugging Face directory or a
`.gguf` file, and the device it runs on. Below policies and training, which both need it.

A `.gguf` file (llama.cpp's format, how many users keep local models) is converted once by
transformers' GGUF loader (the optional `gguf` extra) into a Hugging Face directory under
`$SELFEVOLVE_CACHE` (default ~/.cache/selfevolve), keyed by the file's path, size and time:
the served policy, the learner and vLLM then all load the same ordinary directory. The
weights are dequantized to fp32, so LoRA trains on what the quantized file holds.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from importlib.resources import files
from pathlib import Path

import torch

from selfevolve.errors import UserError

# The bundled models by name (README, "The tiny world"): `tiny`, and `tiny-look`, whose sampled
# second attempts sometimes re-derive step by step what the first answered directly.
BUNDLED = {"tiny": "selfevolve.tiny", "tiny-look": "selfevolve.tiny_look"}


def resolve_model_path(model: str) -> Path:
    """A name in `BUNDLED` -> that model's directory; `x.gguf` -> its converted directory;
    anything else must be a local HF model directory."""
    path = Path(str(files(BUNDLED[model]))) if model in BUNDLED else Path(model).expanduser()
    if path.suffix == ".gguf":
        return gguf_directory(path)
    if not path.is_dir():
        raise UserError(f"model={model}: no such directory (use `tiny`, `tiny-look` or a local Hugging Face model "
                        "directory)")
    if not (path / "config.json").is_file():
        raise UserError(f"model={model}: not a model directory (no config.json in {path})")
    return path


def resolve_device(device: str) -> torch.device:
    """`auto` -> CUDA where there is one, else CPU; `cuda` on a machine without one is a UserError."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={device}: CUDA is not available on this machine")
    return torch.device(device)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` -> bfloat16 on CUDA, float32 on CPU (bf16 matmuls are slow on most CPUs)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


# glibc's malloc raises its mmap threshold each time a large block is freed (up to 32 MiB), so
# the activations and logits of a CPU forward end up in a heap that fragments and is never
# given back: a SmolLM2-135M step on two 2,048-token rows peaked at +1.9 GB above the model
# with that default, +0.7 GB with a fixed 1 MiB threshold (tensors above it are mapped and
# unmapped). Mapping costs page faults: a third more time on tiny, where memory is no issue,
# so only processes that hold a model this large change it.
ALLOCATOR_MIN_PARAMETERS = 50_000_000
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def release_freed_memory(model, device: torch.device, threshold: int = 2**20) -> bool:
    """On CPU with glibc, for a model of at least ALLOCATOR_MIN_PARAMETERS, fix malloc's mmap
    threshold at `threshold` bytes so freed tensors return to the OS (unless the user set
    MALLOC_MMAP_THRESHOLD_ themselves). Returns whether it changed anything."""
    if device.type != "cpu" or not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    if sum(p.numel() for p in model.parameters()) < ALLOCATOR_MIN_PARAMETERS:
        return False
    import ctypes

    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):  # not glibc (musl, another libc): its own behaviour stays
        return False


def cache_dir() -> Path:
    return Path(os.environ.get("SELFEVOLVE_CACHE") or Path.home() / ".cache" / "selfevolve")


def gguf_directory(path: Path) -> Path:
    """The Hugging Face directory converted from the GGUF file `path` (converted on first use;
    a half-written conversion is never used: it is renamed into place when complete)."""
    if not path.is_file():
        raise UserError(f"model={path}: no such file")
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_dir() / "gguf" / f"{path.stem}-{key}"
    if (out / "config.json").is_file():
        return out
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise UserError(f"model={path}: reading .gguf files needs the gguf package "
                        "(pip install \"selfevolve[gguf]\")") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {path.name} to a Hugging Face directory (once): {out}", file=sys.stderr, flush=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"model={path}: transformers cannot read this GGUF file "
                        f"({str(e).splitlines()[0][:160]})") from None
    # transformers will not save a model loaded from GGUF: copy its (dequantized) weights
    # into a plain one built from the same config
    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(out)
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)
    return out
