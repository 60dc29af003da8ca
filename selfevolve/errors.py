"""The errors a user sees as one line (the CLI prints the message and exits 2).

They live in their own module, below everything else, so any layer can raise them without
importing the config or the run machinery (see docs/architecture.md, "Rooms and layers").
"""

from __future__ import annotations

import errno
import re
import sqlite3


class UserError(Exception):
    """Bad input from the user: the CLI prints the message as one line and exits 2."""


class WriteFailed(OSError):
    """A file of a run could not be written (disk full, quota, file-size limit). What was
    there before is intact: temp files are removed and appends are rolled back. The CLI
    prints one line and exits 2."""


class SyncError(RuntimeError):
    """The served policy is not serving the update it was given (publish.verify_sync)."""


class NonFinite(RuntimeError):
    """A loss, a gradient, a weight or a canary is NaN or infinite: the run stops before the
    optimizer steps on it or the update is served; the last checkpoint stays resumable."""


def disk_full(e: BaseException) -> bool:
    """Did a write fail for lack of room (disk full, quota, file-size limit)? SQLite says
    so only in its message, and safetensors gives the OS error's number only there.

    >>> disk_full(OSError(errno.ENOSPC, "No space left on device")), disk_full(ValueError("x"))
    (True, False)
    >>> disk_full(RuntimeError("Error while serializing: I/O error: File too large (os error 27)"))
    True
    """
    room = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
    if isinstance(e, sqlite3.OperationalError):
        return "full" in str(e) or "disk I/O" in str(e)
    if isinstance(e, WriteFailed) or getattr(e, "errno", None) in room:
        return True
    number = re.search(r"\(os error (\d+)\)", str(e))
    return number is not None and int(number[1]) in room
