"""Agents and queues as the admin manages them, and who a bearer token belongs to.

A token is `AGENT_ID.SECRET`, shown once at registration; the store keeps only its SHA-256
(a random 192-bit secret needs no slow hash). Authentication loads the agent named in the
token from the event store, so a token works the moment it is issued and stops the moment
it is replaced, without waiting for a projection.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any

from eventsourcing.persistence import IntegrityError

from inbox.access import BUILTIN_ADMIN, Principal
from inbox.commands import retrying
from inbox.contact import CHANNELS
from inbox.domain import ids
from inbox.domain.agent import PRESENCES, Agent, AgentError, check_profile
from inbox.domain.conversation import MAX_PRIORITY, is_priority
from inbox.domain.errors import DomainError
from inbox.domain.queue import Queue
from inbox.domain.sla import SlaPolicy, SlaPolicyError
from inbox.domain.time import Clock, iso, system_clock
from inbox.identity import InvalidIdentity, normalise_phone
from inbox.ports import EventStorePort

_AGENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}\Z")
_QUEUE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}\Z")
# "messaging" is the capacity shared by the text channels an agent has no own number for
CAPACITY_KEYS = CHANNELS | {"messaging"}


class InvalidSpec(ValueError):
    """A request body that names something impossible (the API answers 422)."""


class AlreadyExists(DomainError):
    pass


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _strings(data: Mapping[str, Any], name: str) -> list[str]:
    value = data.get(name, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise InvalidSpec(f"{name} must be a list of non-empty strings")
    return sorted({v.strip() for v in value})


def _optional_string(data: Mapping[str, Any], name: str) -> str | None:
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise InvalidSpec(f"{name} must be a non-empty string or null")
    return value.strip()


def agent_profile(data: Mapping[str, Any]) -> dict[str, Any]:
    """name, role, skills, languages, capacity from a request body, checked."""
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise InvalidSpec("name is required (a non-empty string)")
    role = data.get("role", "agent")
    capacity = data.get("capacity", {})
    if not isinstance(capacity, dict):
        raise InvalidSpec("capacity must be an object of channel: slots")
    unknown = sorted(set(capacity) - CAPACITY_KEYS)
    if unknown:
        raise InvalidSpec(f"capacity: unknown channel {unknown[0]!r}")
    try:
        check_profile(str(role), capacity)
    except AgentError as exc:
        raise InvalidSpec(str(exc)) from None
    voice_to = _optional_string(data, "voice_to")
    if voice_to is not None and not voice_to.startswith(("client:", "sip:")):
        try:
            voice_to = normalise_phone(voice_to)
        except InvalidIdentity:
            raise InvalidSpec("voice_to must be an E.164 number, client:NAME or sip:...") from None
    return {
        "name": name.strip(),
        "role": role,
        "voice_to": voice_to,
        "skills": _strings(data, "skills"),
        "languages": [lang.lower() for lang in _strings(data, "languages")],
        "capacity": {k: int(v) for k, v in sorted(capacity.items())},
    }


QUEUE_NAME_RULE = "a queue name is 1-64 of a-z, 0-9, _ and -, starting alphanumeric"


def is_queue_name(name: str) -> bool:
    return _QUEUE_NAME.match(name) is not None


def queue_spec(name: str, data: Mapping[str, Any]) -> dict[str, Any]:
    """A queue definition from a request body, checked; `sla` through SlaPolicy."""
    if not is_queue_name(name):
        raise InvalidSpec(QUEUE_NAME_RULE)
    channels = _strings(data, "channels")
    unknown = sorted(set(channels) - CHANNELS)
    if unknown:
        raise InvalidSpec(f"channels: unknown channel {unknown[0]!r}")
    priority = data.get("priority", 0)
    if not is_priority(priority):
        raise InvalidSpec(f"priority must be a whole number from 0 to {MAX_PRIORITY}")
    sla = data.get("sla")
    if sla is not None:
        if not isinstance(sla, dict):
            raise InvalidSpec("sla must be an object")
        try:
            sla = SlaPolicy.from_dict({**sla, "queue": name}, where="sla").to_dict()
        except SlaPolicyError as exc:
            raise InvalidSpec(str(exc)) from None
    language = _optional_string(data, "language")
    return {
        "skill": _optional_string(data, "skill"),
        "channels": channels,
        "language": None if language is None else language.lower(),
        "priority": priority,
        # our addresses that lead here: an email address, a number, a page or account id
        "entry_points": [e.lower() for e in _strings(data, "entry_points")],
        "keywords": [k.lower() for k in _strings(data, "keywords")],
        "sla": sla,
        "sla_actions": _sla_actions(data.get("sla_actions")),
    }


SLA_ACTIONS = ("alert", "raise_priority", "reassign", "escalate")


def _sla_actions(value: Any) -> dict[str, list[str]]:
    """What a warning and a breach do: {"warning": [...], "breach": [...]}; `escalate` moves
    the conversation to the queue named by `escalation_queue`, default "escalations"."""
    if value is None:
        return {"warning": ["alert"], "breach": ["alert", "raise_priority"]}
    if not isinstance(value, dict) or set(value) - {"warning", "breach"}:
        raise InvalidSpec('sla_actions must be {"warning": [...], "breach": [...]}')
    actions: dict[str, list[str]] = {}
    for when in ("warning", "breach"):
        listed = value.get(when, [])
        if not isinstance(listed, list) or any(a not in SLA_ACTIONS for a in listed):
            raise InvalidSpec(f"sla_actions.{when} must list some of {', '.join(SLA_ACTIONS)}")
        actions[when] = list(dict.fromkeys(listed))
    return actions


# An agent's token is checked against their aggregate: two reads of the event store (its
# latest snapshot and the events after it). The answer is kept this long: a token replaced,
# or a role or skills changed, through another process takes effect within it (through this
# Directory, at once).
AUTH_TTL = 2.0
_AUTH_KEEP = 10_000  # tokens remembered at most (valid ones only)


class Directory:
    """Registers agents, defines queues, changes presence, and authenticates tokens."""

    def __init__(
        self,
        store: EventStorePort,
        *,
        admin_token: str,
        clock: Clock = system_clock,
        new_secret: Callable[[], str] = lambda: secrets.token_urlsafe(24),
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.admin_token = admin_token
        self.clock = clock
        self.new_secret = new_secret
        self.monotonic = monotonic
        self._authenticated: dict[str, tuple[Principal, float]] = {}

    def _at(self) -> str:
        return iso(self.clock())

    def agent(self, agent_id: str) -> Agent | None:
        agent = self.store.get(ids.agent_id(agent_id))
        return agent if isinstance(agent, Agent) else None

    def register(self, agent_id: str, profile: Mapping[str, Any], *, actor: str) -> str:
        """Records the agent; returns its token (the only time it exists in clear)."""
        if not _AGENT_ID.match(agent_id) or agent_id == BUILTIN_ADMIN:
            raise InvalidSpec(
                "id must be 1-64 of letters, digits, _ . @ - (and not the built-in admin)"
            )
        token = f"{agent_id}.{self.new_secret()}"
        agent = Agent.register(
            agent_id=agent_id, token_hash=token_hash(token), actor=actor, at=self._at(), **profile
        )
        try:
            self.store.save(agent)
        except IntegrityError:
            raise AlreadyExists(f"agent {agent_id} exists") from None
        return token

    def _retrying(self, agent_id: str, act: Callable[[Agent], None]) -> Agent:
        def decide() -> Agent:
            agent = self.agent(agent_id)
            if agent is None:
                raise LookupError(f"no agent {agent_id}")
            act(agent)
            self.store.save(agent)
            return agent

        changed = retrying(decide)
        self._forget_tokens_of(agent_id)
        return changed

    def _forget_tokens_of(self, agent_id: str) -> None:
        for token in [t for t in self._authenticated if t.rpartition(".")[0] == agent_id]:
            self._authenticated.pop(token, None)

    def change_profile(self, agent_id: str, profile: Mapping[str, Any], *, actor: str) -> Agent:
        return self._retrying(
            agent_id, lambda a: a.change_profile(actor=actor, at=self._at(), **profile)
        )

    def replace_token(self, agent_id: str, *, actor: str) -> str:
        token = f"{agent_id}.{self.new_secret()}"
        self._retrying(
            agent_id, lambda a: a.replace_token(token_hash(token), actor=actor, at=self._at())
        )
        return token

    def set_presence(self, agent_id: str, status: str, *, reason: str, actor: str) -> Agent:
        if status not in PRESENCES:
            raise InvalidSpec(f"status must be one of {', '.join(PRESENCES)}")
        return self._retrying(
            agent_id,
            lambda a: a.set_presence(status, reason=reason, actor=actor, at=self._at()),
        )

    def builtin(self, token: str) -> Principal | None:
        """The built-in admin when the token is theirs; no I/O, so callers on an event loop
        need no worker thread for it."""
        if hmac.compare_digest(token.encode(), self.admin_token.encode()):
            return Principal(BUILTIN_ADMIN, "admin")
        return None

    def authenticate(self, token: str) -> Principal | None:
        admin = self.builtin(token)
        if admin is not None:
            return admin
        agent_id, dot, secret = token.rpartition(".")
        if not dot or not agent_id or not secret:
            return None
        now = self.monotonic()
        kept = self._authenticated.get(token)
        if kept is not None and kept[1] > now:
            return kept[0]
        agent = self.agent(agent_id)
        if agent is None or not hmac.compare_digest(agent.token_hash, token_hash(token)):
            self._authenticated.pop(token, None)
            return None
        principal = Principal(agent.agent_id, agent.role, frozenset(agent.skills))
        if len(self._authenticated) >= _AUTH_KEEP:
            self._authenticated.clear()
        self._authenticated[token] = (principal, now + AUTH_TTL)
        return principal

    # -- queues ----------------------------------------------------------------------------

    def queue(self, name: str) -> Queue | None:
        queue = self.store.get(ids.queue_id(name))
        return queue if isinstance(queue, Queue) else None

    def define_queue(self, name: str, spec: dict[str, Any], *, actor: str) -> bool:
        """Defines or changes a queue; True when it is new."""

        def decide() -> bool:
            queue = self.queue(name)
            created = queue is None
            if queue is None:
                queue = Queue(name=name, spec=spec, actor=actor, at=self._at())
            else:
                queue.change(spec, actor=actor, at=self._at())
            self.store.save(queue)
            return created

        return retrying(decide)
