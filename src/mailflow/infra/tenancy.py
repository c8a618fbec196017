"""Infra room: whose rows a connection sees - the one place tenant scoping is set.

Every connection mailflow opens for domain work takes one of two PostgreSQL roles, created
by migrations/0007_tenants.sql:

- `mailflow_tenant` with the setting `mailflow.tenant`: row-level security shows and accepts
  only that tenant's rows. Without the setting it sees no tenant row at all.
- `mailflow_operator`: bypasses row-level security. Only processes that work for every
  tenant take it, by asking for `Scope.operator()`: the relay, the consumers, the queuer and
  the workers, projection rebuilds, `events tail --all-tenants`.

The scope is applied when a connection is opened (pool `configure`, `Runtime.connect()`), so
no query needs to remember it; `cross_tenant()` lifts it for one transaction where a
tenant's process does system work (the sequencer places every tenant's events).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import psycopg

from mailflow.errors import UsageError

TENANT_ROLE = "mailflow_tenant"
OPERATOR_ROLE = "mailflow_operator"
SETTING = "mailflow.tenant"
DEFAULT_TENANT = "default"

_TENANT_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")


def check_tenant_id(tenant: str) -> str:
    """The id as given, or UsageError: 1 to 40 of a-z, 0-9 and '-', not starting with '-'."""
    if not _TENANT_ID.match(tenant or ""):
        raise UsageError(f"tenant id {tenant!r} must be 1 to 40 lowercase letters, digits or '-', starting with one")
    return tenant


@dataclass(frozen=True)
class Scope:
    """One tenant's rows (tenant set), or every tenant's (operator)."""

    tenant: str | None

    @classmethod
    def of(cls, tenant: str) -> Scope:
        return cls(check_tenant_id(tenant))

    @classmethod
    def operator(cls) -> Scope:
        return cls(None)

    @property
    def is_operator(self) -> bool:
        return self.tenant is None

    def statements(self) -> list[tuple[str, tuple[str, ...]]]:
        """What sets this scope for the rest of a session (apply() runs them)."""
        if self.tenant is None:
            return [(f"SET ROLE {OPERATOR_ROLE}", ())]
        return [(f"SET ROLE {TENANT_ROLE}", ()), ("SELECT set_config(%s, %s, false)", (SETTING, self.tenant))]

    def apply(self, conn: psycopg.Connection) -> None:
        """Set this scope for the rest of the session (the connection must be idle)."""
        for sql, params in self.statements():
            conn.execute(sql, params or None)
        if not conn.autocommit:
            conn.commit()

    def __str__(self) -> str:
        return "every tenant (operator)" if self.tenant is None else f"tenant {self.tenant}"


def cross_tenant(conn: psycopg.Connection) -> None:
    """For the rest of the current transaction, see every tenant's rows (system work only)."""
    conn.execute(f"SET LOCAL ROLE {OPERATOR_ROLE}")


# For the rest of a transaction, only `%(tenant)s`'s rows: how the write path scopes an
# operator's process doing one tenant's work (consumers/inline.py). Select-list items.
SCOPE_TO_TENANT = f"set_config('role', '{TENANT_ROLE}', true), set_config('{SETTING}', %(tenant)s, true)"


def qualified(tenant: str, stream: str) -> str:
    """The stream name under its tenant: `acme/job-<id>` (a name already under it is kept)."""
    return stream if stream.startswith(tenant + "/") else f"{tenant}/{stream}"
