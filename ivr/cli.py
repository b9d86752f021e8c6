"""`inbox ivr check FILE [--queues a,b]`: every problem of a menu file, one per line, as
`FILE: PLACE: MESSAGE`; exit status 0 when the menu is valid, 1 otherwise."""

from __future__ import annotations

import sys
from typing import TextIO

from ivr.menu import InvalidMenu, load_menu


def check_command(path: str, queues: list[str] | None, *, out: TextIO | None = None) -> int:
    """Checks the menu at `path`; `queues` are the known queue names ("default" always
    exists), None to leave queue names unchecked (queues are defined at runtime)."""
    stream = out if out is not None else sys.stdout
    known = None if queues is None else {q.strip() for q in queues if q.strip()}
    try:
        menu = load_menu(path, known)
    except InvalidMenu as exc:
        for problem in exc.problems:
            print(f"{path}: {problem.place}: {problem.message}", file=stream)
        return 1
    print(
        f"{path}: ok ({len(menu.nodes)} nodes, languages {', '.join(menu.languages)})",
        file=stream,
    )
    return 0


def parse_queues(text: str | None) -> list[str] | None:
    """`--queues a,b` as a list; None when the option was not given."""
    if text is None:
        return None
    return [name.strip() for name in text.split(",") if name.strip()]
