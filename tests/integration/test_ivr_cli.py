"""`inbox ivr check FILE` and a bad menu stopping `inbox dev` at start, as real processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).parents[2] / "ivr" / "menus" / "example.toml"


def _bad_menu(path: Path) -> Path:
    """The bundled menu with an unknown node and a duplicate digit."""
    text = EXAMPLE.read_text()
    text = text.replace('node = "office"', 'node = "nowhere"', 1)
    text = text.replace('digit = "2"', 'digit = "1"', 1)
    path.write_text(text)
    return path


def _inbox(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "inbox.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_ivr_check_names_every_problem_and_the_bundled_menu_passes(tmp_path: Path) -> None:
    bad = _bad_menu(tmp_path / "menu.toml")
    env = {"INBOX_DATA_DIR": str(tmp_path)}
    checked = _inbox("ivr", "check", str(bad), env=env)
    assert checked.returncode == 1
    assert "nowhere" in checked.stdout
    assert "nodes.welcome" in checked.stdout
    assert "duplicate" in checked.stdout
    assert all(line.startswith(f"{bad}: ") for line in checked.stdout.strip().splitlines())
    assert _inbox("ivr", "check", str(EXAMPLE), env=env).returncode == 0


def test_a_bad_menu_stops_inbox_dev_at_start(tmp_path: Path) -> None:
    bad = _bad_menu(tmp_path / "menu.toml")
    started = _inbox("dev", env={"INBOX_DATA_DIR": str(tmp_path), "INBOX_IVR_CONFIG": str(bad)})
    assert started.returncode == 1
    assert "nowhere" in started.stderr
    assert not (tmp_path / "broker.log").exists()  # stopped before starting anything
