"""A fingerprint of source files: saved states (aggregate snapshots, the routing process's
state) are used only by the code that wrote them."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path


def source_fingerprint(seed: str, base: Path, patterns: Iterable[str]) -> str:
    """`seed` (a version string) and every file under `base` matching `patterns`: its path
    relative to `base` and its bytes."""
    digest = hashlib.sha256(seed.encode())
    for pattern in patterns:
        for path in sorted(base.glob(pattern)):
            digest.update(str(path.relative_to(base)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
