"""Output directories named by users (``--out``): made, or refused with one line naming the path."""

from __future__ import annotations

import os
import re

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")

MOUNT_HINT = "mount the bucket, with s3fs, gcsfuse or blobfuse2 for example, and give its path"


def url_note(path: str, what: str = "a local or mounted folder") -> str | None:
    """``"s3://b/t: a URL, not ...; mount ..."`` when ``path`` is a URL (``scheme://...``), else None:
    maskloom reads and writes files through the operating system, and ``os.makedirs("s3://b/t")``
    would make a local folder named ``s3:`` without a word."""
    if not _URL.match(os.fspath(path)):
        return None
    return f"{path}: a URL, not {what}: maskloom reads and writes files on local or mounted storage ({MOUNT_HINT})"


class OutDirError(ValueError):
    """An output directory that cannot be used: a file of that name, or one that cannot be made."""


def check_out_dir(path: str) -> None:
    """Raise OutDirError when a file (not a directory) has the name ``path``, or when ``path`` is a
    URL (:func:`url_note`): checked before a command's work, where the directory itself is made later."""
    if note := url_note(path):
        raise OutDirError(note)
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
