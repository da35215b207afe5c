"""The filters of each list (``?domain=...&active=...``), as django-filter sets."""

import django_filters
from django import forms
from django.db.models import F, QuerySet
from django.utils.translation import gettext_lazy as _

from mailadmin.models import Alias, AliasDestination, AuditEntry, Domain, Mailbox, Pop3Session

# What a yes-or-no query parameter (a filter, ``?dry_run=``, ``?force=``) may say.
FLAGS = {"true": True, "1": True, "false": False, "0": False}
NOT_A_FLAG = _("Give true or false.")


class FlagField(forms.Field):
    """true/false/1/0, any case; anything else is refused rather than ignored."""

    def to_python(self, value: str | None) -> bool | None:
        if value in (None, ""):
            return None
        try:
            return FLAGS[value.strip().lower()]
        except KeyError:
            raise forms.ValidationError(NOT_A_FLAG, code="invalid") from None


class BooleanFilter(django_filters.BooleanFilter):
    field_class = FlagField


class MailboxFilter(django_filters.FilterSet):
    domain = django_filters.CharFilter(field_name="domain__name")
    active = BooleanFilter()
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
    active = BooleanFilter()

    class Meta:
        model = Domain
        fields = ["active"]


class AliasFilter(django_filters.FilterSet):
    domain = django_filters.CharFilter(field_name="domain__name")
    active = BooleanFilter()
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
    open = BooleanFilter(field_name="ended_at", lookup_expr="isnull")
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
