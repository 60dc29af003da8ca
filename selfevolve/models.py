"""Where a model comes from: `tiny` (the bundled model), a local Hugging Face directory, and
the device it runs on. Below policies and training, which both need it."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import torch

from .errors import UserError


def resolve_model_path(model: str) -> Path:
    """`tiny` -> the bundled model's directory; anything else must be a local HF model dir."""
    path = Path(str(files("selfevolve.tiny"))) if model == "tiny" else Path(model).expanduser()
    if not path.is_dir():
        raise UserError(f"model={model}: no such directory (use `tiny` or a local Hugging Face model directory)")
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
