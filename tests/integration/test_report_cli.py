"""`inbox report` as a process: the formats, the time window, and a clear refusal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def _inbox(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "inbox.cli", "report", *args],
        env={**os.environ, "INBOX_DATA_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_report_formats_and_refusals(tmp_path: Path) -> None:
    window = ["--from", "2026-11-26T00:00:00Z", "--to", "2026-11-27T00:00:00Z"]
    as_json = _inbox(tmp_path, *window, "--format", "json", "--bucket", "hour")
    assert as_json.returncode == 0, as_json.stderr
    answer = json.loads(as_json.stdout)
    assert len(answer["buckets"]) == 24
    assert answer["total"]["volume"]["email"] == 0
    assert answer["total"]["service_level"] is None  # nothing to measure

    png = tmp_path / "kpis.png"
    drawn = _inbox(tmp_path, *window, "--format", "png", "--bucket", "day", "--out", str(png))
    assert drawn.returncode == 0, drawn.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    refused = _inbox(tmp_path, *window, "--tz", "Mars/Olympus_Mons")
    assert refused.returncode == 2
    assert "Mars/Olympus_Mons" in refused.stderr
