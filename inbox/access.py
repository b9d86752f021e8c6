"""Who may do what: roles, the principal behind a bearer token, and the one table of
permissions every endpoint checks.

CONTRACT.md's roles: admin manages agents, queues and rules (and, here, may also do
everything a supervisor can: an admin locked out of the inbox would only log in as someone
else); supervisor does everything an agent can on any conversation, plus escalation queues
and metrics; agent works their own and their queues' conversations; auditor reads the audit
history and metrics, nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

ADMIN, SUPERVISOR, AGENT, AUDITOR = "admin", "supervisor", "agent", "auditor"
BUILTIN_ADMIN = "admin"

PERMISSIONS: dict[str, frozenset[str]] = {
    "agents.manage": frozenset({ADMIN}),
    "agents.read": frozenset({ADMIN, SUPERVISOR}),
    "queues.manage": frozenset({ADMIN}),
    "queues.read": frozenset({ADMIN, SUPERVISOR}),
    "presence.own": frozenset({SUPERVISOR, AGENT}),
    "conversations.read": frozenset({ADMIN, SUPERVISOR, AGENT}),
    "conversations.act": frozenset({ADMIN, SUPERVISOR, AGENT}),
    "conversations.audit": frozenset({ADMIN, SUPERVISOR, AUDITOR}),
    "customers.read": frozenset({ADMIN, SUPERVISOR, AGENT}),
    "customers.merge": frozenset({ADMIN, SUPERVISOR}),
    "customers.vip": frozenset({ADMIN, SUPERVISOR}),
    "escalations.read": frozenset({ADMIN, SUPERVISOR}),
    "metrics.read": frozenset({ADMIN, SUPERVISOR, AUDITOR}),
    "stream": frozenset({ADMIN, SUPERVISOR, AGENT}),
}


@dataclass(frozen=True)
class Principal:
    agent_id: str  # "admin" for the built-in admin token
    role: str
    skills: frozenset[str] = frozenset()

    def may(self, permission: str) -> bool:
        return self.role in PERMISSIONS[permission]

    @property
    def sees_everything(self) -> bool:
        """Supervisors and admins act on any conversation; agents on their own and their
        queues' ones."""
        return self.role in (ADMIN, SUPERVISOR)


def can_work_on(
    principal: Principal,
    *,
    assignee: str | None,
    offered_to: str | None,
    queue: str | None,
    queue_skill: str | None,
) -> bool:
    """An agent's scope: assigned or offered to them, or unassigned in a queue they have the
    skill for (a queue without a skill is everyone's). A conversation routing has not put in
    a queue yet is the supervisors' (as on the live stream)."""
    if principal.sees_everything:
        return True
    if assignee is not None:
        return assignee == principal.agent_id
    if offered_to is not None and offered_to == principal.agent_id:
        return True
    return queue is not None and (queue_skill is None or queue_skill in principal.skills)
