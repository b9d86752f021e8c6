"""Read models that follow the event store's notification log (see docs/projections.md)."""

from projections.db import ReadModelDB, open_read_models
from projections.inbox_view import QueryError, get_customer, list_conversations
from projections.replay import PROJECTIONS, rebuild, run_replay
from projections.runner import ProjectionRunner
from projections.timeline import get_conversation
from projections.tracking import positions

__all__ = [
    "PROJECTIONS",
    "ProjectionRunner",
    "QueryError",
    "ReadModelDB",
    "get_conversation",
    "get_customer",
    "list_conversations",
    "open_read_models",
    "positions",
    "rebuild",
    "run_replay",
]
