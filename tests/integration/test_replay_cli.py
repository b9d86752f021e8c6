"""`inbox replay` as a process: an unknown projection is refused with the known ones, and
nothing is created."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_an_unknown_projection_is_refused_with_the_known_ones(tmp_path: Path) -> None:
    refused = subprocess.run(
        [sys.executable, "-m", "inbox.cli", "replay", "inboxx", "--from-start"],
        env={**os.environ, "INBOX_DATA_DIR": str(tmp_path / "data")},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert refused.returncode == 2
    assert "unknown projection 'inboxx'" in refused.stderr
    assert "inbox, timeline" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert not (tmp_path / "data").exists()  # refused before anything was opened
