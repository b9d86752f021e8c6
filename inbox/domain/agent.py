"""An agent (or supervisor, admin, auditor): who they are, what they can handle, and whether
they are there. Their token is kept only as a hash: it is shown once, at registration."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from eventsourcing.domain import Aggregate

from inbox.domain import ids
from inbox.domain.base import DomainAggregate
from inbox.domain.errors import DomainError

ROLES = ("admin", "supervisor", "agent", "auditor")
PRESENCES = ("available", "away", "offline")


class AgentError(DomainError):
    pass


class Agent(DomainAggregate):
    class Registered(Aggregate.Created):
        """`voice_to`: where calls for this agent ring: an E.164 number, `client:NAME` (a
        Twilio Client) or `sip:...`; None: the agent takes no calls."""

        class_version = 2
        agent_id: str
        name: str
        role: str
        skills: list[str]
        languages: list[str]
        capacity: dict[str, int]
        voice_to: str | None
        token_hash: str
        actor: str
        at: str

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            state["voice_to"] = None

    class ProfileChanged(Aggregate.Event):
        class_version = 2
        name: str
        role: str
        skills: list[str]
        languages: list[str]
        capacity: dict[str, int]
        voice_to: str | None
        actor: str
        at: str

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            state["voice_to"] = None

        def apply(self, aggregate: Any) -> None:
            aggregate.name, aggregate.role = self.name, self.role
            aggregate.skills, aggregate.languages = list(self.skills), list(self.languages)
            aggregate.capacity = dict(self.capacity)
            aggregate.voice_to = self.voice_to

    class TokenReplaced(Aggregate.Event):
        class_version = 1
        token_hash: str
        actor: str
        at: str

        def apply(self, aggregate: Any) -> None:
            aggregate.token_hash = self.token_hash

    class PresenceChanged(Aggregate.Event):
        """`reason`: "set by agent", "stream disconnected", "missed 3 offers", ..."""

        class_version = 1
        status: str
        reason: str
        actor: str
        at: str

        def apply(self, aggregate: Any) -> None:
            aggregate.presence = self.status
            aggregate.presence_since = self.at

    @staticmethod
    def create_id(agent_id: str) -> UUID:
        return ids.agent_id(agent_id)

    def __init__(
        self,
        agent_id: str,
        name: str,
        role: str,
        skills: list[str],
        languages: list[str],
        capacity: dict[str, int],
        voice_to: str | None,
        token_hash: str,
        actor: str,
        at: str,
    ) -> None:
        self.agent_id = agent_id
        self.voice_to = voice_to
        self.name = name
        self.role = role
        self.skills = list(skills)
        self.languages = list(languages)
        self.capacity = dict(capacity)
        self.token_hash = token_hash
        self.presence = "offline"
        self.presence_since = at

    @classmethod
    def register(cls, **fields: Any) -> Agent:
        check_profile(fields["role"], fields["capacity"])
        fields.setdefault("voice_to", None)  # an agent who takes no calls
        return cls._create(cls.Registered, **fields)

    def change_profile(self, *, actor: str, at: str, **profile: Any) -> None:
        check_profile(profile["role"], profile["capacity"])
        self.trigger_event(self.ProfileChanged, actor=actor, at=at, **profile)

    def replace_token(self, token_hash: str, *, actor: str, at: str) -> None:
        self.trigger_event(self.TokenReplaced, token_hash=token_hash, actor=actor, at=at)

    def set_presence(self, status: str, *, reason: str, actor: str, at: str) -> None:
        if status not in PRESENCES:
            raise AgentError(f"presence must be one of {', '.join(PRESENCES)}")
        if status == self.presence:
            return  # nothing changed: nothing to record
        self.trigger_event(self.PresenceChanged, status=status, reason=reason, actor=actor, at=at)


def check_profile(role: str, capacity: dict[str, int]) -> None:
    if role not in ROLES:
        raise AgentError(f"role must be one of {', '.join(ROLES)}")
    for channel, slots in capacity.items():
        if not isinstance(slots, int) or isinstance(slots, bool) or slots < 0:
            raise AgentError(f"capacity.{channel} must be a whole number >= 0")
