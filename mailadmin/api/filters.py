"""The filters of each list (``?domain=...&active=...``), as django-filter sets."""

import django_filters
from django.db.models import F, QuerySet

from mailadmin.models import Alias, AliasDestination, AuditEntry, Domain, Mailbox, Pop3Session


class MailboxFilter(django_filters.FilterSet):
    domain = django_filters.CharFilter(field_name="domain__name")
    active = django_filters.BooleanFilter()
    over_percent = django_filters.NumberFilter(
        method="filter_over_percent", label="Mailboxes using at least this percentage of their quota."
    )

    class Meta:
        model = Mailbox
        fields = ["domain", "active", "over_percent"]

    def filter_over_percent(self, rows: QuerySet, name: str, value) -> QuerySet:
        return (
            rows.filter(quota_bytes__gt=0)
            .alias(used_hundredths=F("used_bytes") * 100)
            .filter(used_hundredths__gte=F("quota_bytes") * value)
        )


class DomainFilter(django_filters.FilterSet):
    active = django_filters.BooleanFilter()

    class Meta:
        model = Domain
        fields = ["active"]


class AliasFilter(django_filters.FilterSet):
    domain = django_filters.CharFilter(field_name="domain__name")
    active = django_filters.BooleanFilter()
    destination = django_filters.CharFilter(
        method="filter_destination", label="Aliases with this address among their destinations."
    )

    class Meta:
        model = Alias
        fields = ["domain", "active", "destination"]

    def filter_destination(self, rows: QuerySet, name: str, value: str) -> QuerySet:
        # A subquery, not a join: a join would repeat the rows the received counts are summed over.
        return rows.filter(pk__in=AliasDestination.objects.filter(address__iexact=value).values("alias"))


class SessionFilter(django_filters.FilterSet):
    mailbox = django_filters.CharFilter(field_name="username", lookup_expr="iexact")
    domain = django_filters.CharFilter(field_name="domain__name")
    client_address = django_filters.CharFilter(field_name="peer_host")
    open = django_filters.BooleanFilter(field_name="ended_at", lookup_expr="isnull")
    since = django_filters.IsoDateTimeFilter(field_name="started_at", lookup_expr="gte")
    until = django_filters.IsoDateTimeFilter(field_name="started_at", lookup_expr="lt")

    class Meta:
        model = Pop3Session
        fields = ["mailbox", "domain", "client_address", "open", "since", "until"]


class AuditFilter(django_filters.FilterSet):
    domain = django_filters.CharFilter(field_name="domain_name")
    actor = django_filters.CharFilter(field_name="actor_name")
    action = django_filters.CharFilter()
    object_type = django_filters.CharFilter()
    since = django_filters.IsoDateTimeFilter(field_name="created_at", lookup_expr="gte")
    until = django_filters.IsoDateTimeFilter(field_name="created_at", lookup_expr="lt")

    class Meta:
        model = AuditEntry
        fields = ["domain", "actor", "action", "object_type", "since", "until"]
