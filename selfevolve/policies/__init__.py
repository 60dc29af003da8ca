"""Policies: everything that answers conversations (DESIGN.md §4)."""

from .hf import HFPolicy, resolve_device, resolve_model_path

__all__ = ["HFPolicy", "resolve_model_path", "resolve_device"]
