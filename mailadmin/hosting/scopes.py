"""What an actor may see: one queryset filter per model, all from one table of domain paths.

Rows without a domain (a failed login for a name that is none of ours, an audit entry about
an administrator) are visible only to actors whose scope is every domain.
"""

from django.db.models import Model, QuerySet

from mailadmin.hosting.actors import Actor
from mailadmin.models import (
    Alias,
    AliasDomain,
    AuditEntry,
    AuthFailure,
    DeliveryFigures,
    Domain,
    DomainCatchAll,
    HourlyFigures,
    Mailbox,
    Message,
    Pop3Session,
)

# How each scoped model reaches the domain it belongs to.
DOMAIN_PATHS: dict[type[Model], str] = {
    Domain: "pk",
    Mailbox: "domain",
    Message: "mailbox__domain",
    Pop3Session: "domain",
    AuthFailure: "domain",
    AuditEntry: "domain",
    HourlyFigures: "domain",
    DeliveryFigures: "domain",
    Alias: "domain",
    DomainCatchAll: "domain",
    AliasDomain: "target",
}


def visible_to(actor: Actor, rows: type[Model] | QuerySet) -> QuerySet:
    """``rows`` (a model or a queryset of one) narrowed to what ``actor`` may see."""
    queryset = rows if isinstance(rows, QuerySet) else rows._default_manager.all()
    if actor.all_domains:
        return queryset
    return queryset.filter(**{f"{DOMAIN_PATHS[queryset.model]}__in": actor.domain_ids})
