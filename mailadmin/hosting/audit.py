"""The audit log: one row per change made through the service layer, written in its transaction.

Callers pass the fields that changed; secrets are replaced here, in one place, so no caller can
record a password or hash by mistake.
"""

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from django.db.models import QuerySet
from django.utils import timezone

from mailadmin.hosting import scopes
from mailadmin.hosting.actors import Actor
from mailadmin.models import AuditEntry, Domain

SECRET_FIELDS = frozenset({"password", "password_hash"})
SECRET_CHANGED = "changed"
BATCH_SIZE = 500


def changed_fields(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, list[Any]]:
    """``{field: [before, after]}`` for each field of ``after`` whose value differs from ``before``."""
    return {name: [before.get(name), value] for name, value in after.items() if before.get(name) != value}


def record(
    actor: Actor,
    action: str,
    object_type: str,
    object_name: str,
    *,
    domain: Domain | None = None,
    domain_name: str = "",
    changes: Mapping[str, Any] | None = None,
) -> AuditEntry:
    """Write one entry; call inside the transaction that makes the change.

    ``domain_name`` alone serves when the domain row is gone (its deletion).
    """
    entry = unsaved(
        actor, action, object_type, object_name, domain=domain, domain_name=domain_name, changes=changes
    )
    entry.save(force_insert=True)
    return entry


def record_many(entries: list[AuditEntry]) -> None:
    """Write entries made by ``unsaved`` in batches; call inside the transaction of the changes."""
    AuditEntry.objects.bulk_create(entries, batch_size=BATCH_SIZE)


def unsaved(
    actor: Actor,
    action: str,
    object_type: str,
    object_name: str,
    *,
    domain: Domain | None = None,
    domain_name: str = "",
    changes: Mapping[str, Any] | None = None,
) -> AuditEntry:
    """The entry ``record`` writes, not yet saved (for ``record_many``)."""
    return AuditEntry(
        actor_kind=actor.kind,
        actor_name=actor.name,
        actor_user_id=actor.user_id,
        client_address=actor.client_address,
        action=action,
        object_type=object_type,
        object_name=object_name,
        domain=domain,
        domain_name=domain.name if domain is not None else domain_name,
        changes=_without_secrets(changes or {}),
    )


def _without_secrets(changes: Mapping[str, Any]) -> dict[str, Any]:
    return {
        ("password" if name in SECRET_FIELDS else name): (SECRET_CHANGED if name in SECRET_FIELDS else value)
        for name, value in changes.items()
    }


def entries(actor: Actor, *, domain_name: str | None = None, since: datetime | None = None) -> QuerySet:
    """The entries ``actor`` may read, oldest first; by domain name, so a deleted domain's remain."""
    rows = scopes.visible_to(actor, AuditEntry).order_by("created_at", "id")
    if domain_name is not None:
        rows = rows.filter(domain_name=domain_name)
    if since is not None:
        rows = rows.filter(created_at__gte=since)
    return rows


def describe(entry: AuditEntry) -> str:
    """One line: time, who (and from where), what, on which object, and the changes."""
    who = entry.actor_name + (f" from {entry.client_address}" if entry.client_address else "")
    where = f" [{entry.domain_name}]" if entry.domain_name else ""
    changes = " ".join(f"{name}={_change_text(value)}" for name, value in entry.changes.items())
    when = timezone.localtime(entry.created_at).isoformat(timespec="seconds")
    line = f"{when} {who}: {entry.action} {entry.object_type} {entry.object_name}{where}"
    return line + (f" {changes}" if changes else "")


def _change_text(value: Any) -> str:
    if isinstance(value, list) and len(value) == 2:
        return f"{value[0]!r}->{value[1]!r}"
    return str(value)
