"""File helpers every writer of a run directory shares: atomic replacement and the
metrics.jsonl reader. Below `run` and `report`, so neither imports the other for them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from selfevolve.errors import UserError, WriteFailed


def atomic_write(path: Path, text: str) -> None:
    """Write `text` to `path` through a temp file + rename: a reader (or a crash) sees the
    old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise WriteFailed(e.errno, e.strerror, str(path)) from None
    os.replace(tmp, path)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The lines of a metrics.jsonl ([] if there is none). A torn last line (the process
    was killed mid-write) was never logged and is skipped; a bad line elsewhere is an error."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise UserError(f"{path}:{i + 1}: not a JSON line") from None
    return out
