"""Output directories named by users (``--out``): made, or refused with one line naming the path."""

from __future__ import annotations

import os


class OutDirError(ValueError):
    """An output directory that cannot be used: a file of that name, or one that cannot be made."""


def check_out_dir(path: str) -> None:
    """Raise OutDirError when a file (not a directory) has the name ``path``: checked before a
    command's work, where the directory itself is made later."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutDirError(f"{path}: exists and is not a directory; choose another --out")


def make_out_dir(path: str, what: str = "output directory") -> str:
    """Create directory ``path`` (and its parents) if missing; return it.

    Raises OutDirError, a one-line message naming ``path``, when a file has that name or the
    directory cannot be made (a file on the way, no permission, a read-only file system)."""
    check_out_dir(path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise OutDirError(f"{path}: cannot create the {what}: {e.strerror or e}") from None
    return path
