"""The routing process's state, written and read back whole: what lets a restarted
`Distributor` read only the log after its last save instead of all of it.

It is a pickle, as the state is the process's own objects (the router's heaps and indexes,
every conversation's record): writing each by hand would be a second model of them to keep in
step. Two rules keep that safe:

- it is read back only by the same code, with the same router settings, that wrote it: a
  fingerprint of the sources whose classes it holds (inbox/distribution.py, inbox/domain/,
  ivr/estimate.py) and of Python's version; anything else reads the whole log again (and so
  does a store whose record at the saved position is not the one it was saved after:
  `Distributor.restore`);
- reading it builds only classes of this project and a few plain types of the standard
  library: a row someone else wrote cannot run code in the routing process.
"""

from __future__ import annotations

import io
import pickle
import sys
from functools import cache
from pathlib import Path
from typing import Any

import inbox.domain
from inbox.fingerprint import source_fingerprint

_ROOT = Path(inbox.domain.__file__).parent.parent.parent
_SOURCES = ("inbox/distribution.py", "inbox/domain/*.py", "ivr/estimate.py")
_PLAIN = {
    "builtins": frozenset({"set", "frozenset", "dict", "list", "tuple", "bytearray"}),
    "collections": frozenset({"deque", "OrderedDict", "defaultdict"}),
    "datetime": frozenset({"datetime", "date", "timedelta", "timezone"}),
}
_OURS = ("inbox.", "ivr.")


class UnreadableState(ValueError):
    """A saved state this code cannot (or must not) read back."""


@cache
def code_fingerprint() -> str:
    return source_fingerprint(sys.version, _ROOT, _SOURCES)


def dump(config: Any, state: dict[str, Any]) -> bytes:
    """`state` with what it must be read back with: this code and the same `config`."""
    return pickle.dumps(
        {"code": code_fingerprint(), "config": config, "state": state},
        protocol=pickle.HIGHEST_PROTOCOL,
    )


def load(data: bytes, config: Any) -> dict[str, Any]:
    """The state `dump` wrote; raises UnreadableState for any other code, other settings, or
    anything that is not such a state."""
    try:
        saved = _Unpickler(io.BytesIO(data)).load()
        code, saved_config, state = saved["code"], saved["config"], saved["state"]
    except UnreadableState:
        raise
    except Exception as exc:  # garbage can fail in any way; the caller logs it
        raise UnreadableState(f"not a saved state: {exc!r}") from exc
    if code != code_fingerprint():
        raise UnreadableState("written by other code")
    if saved_config != config:
        raise UnreadableState(f"written with other settings: {saved_config!r}")
    if not isinstance(state, dict):
        raise UnreadableState("not a saved state")
    return state


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in _PLAIN.get(module, ()):
            return super().find_class(module, name)
        if module.startswith(_OURS):
            found = super().find_class(module, name)
            if isinstance(found, type):
                return found
        raise UnreadableState(f"refused to build {module}.{name}")
