"""Attachment bytes, stored outside the contact event and addressed by their content.

An event carries `ref = "sha256:<hex>"`; the bytes live at
`<data_dir>/attachments/<first 2 hex>/<hex>`. The same bytes sent twice (a retried delivery, a
logo in every signature) are stored once. A file is written to a temporary name, flushed to
disk and renamed, so a reader never sees half a file and a crash leaves only a temp file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from pathlib import Path

_REF = re.compile(r"^sha256:([0-9a-f]{64})\Z")


class UnknownAttachment(LookupError):
    """A ref that is malformed or names bytes this store does not hold."""


def content_ref(data: bytes) -> str:
    """The ref of `data`: what the event carries and what `AttachmentStore.put` returns."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


class AttachmentStore:
    def __init__(self, data_dir: Path | str) -> None:
        self.root = Path(data_dir) / "attachments"

    def path(self, ref: str) -> Path:
        match = _REF.match(ref)
        if match is None:
            raise UnknownAttachment(f"not an attachment ref: {ref[:80]!r}")
        digest = match.group(1)
        return self.root / digest[:2] / digest

    def put(self, data: bytes) -> str:
        """Stores `data` (once) and returns its ref. Blocking: call it in a thread."""
        ref = content_ref(data)
        path = self.path(ref)
        if path.exists():
            return ref
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
                file.flush()
                # The SMTP server answers 250 only after this: the bytes must survive a crash.
                os.fsync(file.fileno())
            # Two writers of the same bytes both rename complete files: either one wins.
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        _fsync_dir(path.parent)
        return ref

    def get(self, ref: str) -> bytes:
        try:
            return self.path(ref).read_bytes()
        except FileNotFoundError:
            raise UnknownAttachment(f"no attachment {ref}") from None

    def __contains__(self, ref: object) -> bool:
        if not isinstance(ref, str):
            return False
        try:
            return self.path(ref).exists()
        except UnknownAttachment:
            return False


def _fsync_dir(directory: Path) -> None:
    """Makes the rename durable (the directory entry is what a crash could lose)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
