"""The history page: ended POP3 sessions and failed logins, newest first, filtered; the sources that
failed most in the last 24 hours; and, filtered by a mailbox, its last successful login.

Pages are cut by keyset ("older than this row"), not by offset and count: with a million rows a
page costs one index range read whatever its depth, and needs no count of every row. Each
filter has an index that yields its rows newest first (``_history_indexes`` in the models).
"""

from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from urllib.parse import urlencode

from django import forms
from django.contrib.admin import AdminSite
from django.core.exceptions import ValidationError
from django.db.models import Count, Max, Model, Q, QuerySet
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseBadRequest
from django.utils import timezone
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from mailadmin.addresses import domain_of_login
from mailadmin.admin import actor_of, domain_or_404
from mailadmin.console.pages import mailbox_in_scope, render, require
from mailadmin.hosting import scopes
from mailadmin.models import AuthFailure, Domain, Pop3Session
from pop3.mailbox import LoginFailure

PAGE_SIZE = 50
TOP_SOURCES = 10
TOP_SOURCES_WINDOW = timedelta(hours=24)
SESSIONS, FAILURES = "sessions", "failures"
PERMISSIONS = {SESSIONS: "mailadmin.view_pop3session", FAILURES: "mailadmin.view_authfailure"}
CURSOR_SEPARATOR = "_"


@dataclass(frozen=True)
class Kind:
    """How one kind of history row is read: its model, its time column, its reason column."""

    model: type[Model]
    time_field: str
    reason_field: str


KINDS = {
    SESSIONS: Kind(Pop3Session, "started_at", "end_reason"),
    FAILURES: Kind(AuthFailure, "created_at", "reason"),
}


class HistoryFilters(forms.Form):
    kind = forms.ChoiceField(
        choices=[(SESSIONS, gettext_lazy("Ended sessions")), (FAILURES, gettext_lazy("Failed logins"))],
        required=False,
    )
    address = forms.CharField(required=False, label=gettext_lazy("Address"))
    domain = forms.CharField(required=False, label=gettext_lazy("Domain"))
    client = forms.CharField(required=False, label=gettext_lazy("Client address"))
    since = forms.DateField(required=False, label=gettext_lazy("From (date)"))
    until = forms.DateField(required=False, label=gettext_lazy("Until (date)"))
    reason = forms.CharField(required=False, label=gettext_lazy("Reason"))
    before = forms.CharField(required=False)
    after = forms.CharField(required=False)

    def clean(self) -> dict:
        cleaned = super().clean()
        kind = cleaned.get("kind") or SESSIONS
        cleaned["kind"] = kind
        reason = cleaned.get("reason")
        if kind == SESSIONS and reason and reason not in Pop3Session.EndReason.values:
            raise ValidationError(_("Unknown end reason."))
        for name in ("before", "after"):
            if cleaned.get(name):
                cleaned[name] = parse_cursor(KINDS[kind].model, cleaned[name])
        return cleaned


def parse_cursor(model: type[Model], text: str) -> tuple[datetime, object]:
    """``<ISO time>_<primary key>`` of the row a page starts after; ValidationError when malformed."""
    moment, _sep, key = text.rpartition(CURSOR_SEPARATOR)
    try:
        return datetime.fromisoformat(moment), model._meta.pk.to_python(key)
    except (ValueError, ValidationError):
        raise ValidationError(_("Malformed page position.")) from None


def cursor_of(row: Model, kind: Kind) -> str:
    return f"{getattr(row, kind.time_field).isoformat()}{CURSOR_SEPARATOR}{row.pk}"


def history_rows(request: HttpRequest, filters: dict, domain: Domain | None) -> QuerySet:
    """The rows of one kind in the user's scope that match the filters, not yet ordered or cut."""
    kind = KINDS[filters["kind"]]
    rows = scopes.visible_to(actor_of(request), kind.model)
    if kind.model is Pop3Session:
        rows = rows.filter(ended_at__isnull=False)
    if domain is not None:
        rows = rows.filter(domain=domain)
    if filters["address"]:
        rows = rows.filter(username=filters["address"])
    if filters["client"]:
        rows = rows.filter(_client_matches(kind, filters["client"]))
    if filters["reason"]:
        rows = rows.filter(**{kind.reason_field: filters["reason"]})
    if filters["since"]:
        rows = rows.filter(**{f"{kind.time_field}__gte": _start_of(filters["since"])})
    if filters["until"]:
        rows = rows.filter(**{f"{kind.time_field}__lt": _start_of(filters["until"] + timedelta(days=1))})
    return rows


def _client_matches(kind: Kind, client: str) -> Q:
    """A client address; for failed logins also a source they are counted under (an IPv6 /48,
    written with its prefix length), so a source of the top list leads to its failures. One
    column either way, so its index answers (an OR of two columns would test row after row)."""
    if kind.model is AuthFailure and "/" in client:
        return Q(source=client)
    return Q(peer_host=client)


def _start_of(day: date) -> datetime:
    return timezone.make_aware(datetime.combine(day, time.min))


def page_of(rows: QuerySet, kind: Kind, before, after) -> tuple[list, bool, bool]:
    """One page, newest first, starting after the ``before`` row (older) or before ``after`` (newer);
    and whether there are older and newer rows."""
    t = kind.time_field
    if after:
        found = list(_beyond(rows, t, after, "gt").order_by(t, "pk")[: PAGE_SIZE + 1])
        return list(reversed(found[:PAGE_SIZE])), True, len(found) > PAGE_SIZE
    if before:
        rows = _beyond(rows, t, before, "lt")
    found = list(rows.order_by(f"-{t}", "-pk")[: PAGE_SIZE + 1])
    return found[:PAGE_SIZE], len(found) > PAGE_SIZE, bool(before)


def _beyond(rows: QuerySet, t: str, position: tuple, direction: str) -> QuerySet:
    """Rows past ``position`` (time, key) in ``direction`` ("lt": older, "gt": newer). The bare
    time bound is implied by the rest; it is there so the database reads the time index as a
    range instead of testing every row."""
    moment, key = position
    past = Q(**{f"{t}__{direction}": moment}) | Q(**{t: moment, f"pk__{direction}": key})
    return rows.filter(past, **{f"{t}__{direction}e": moment})


def top_failing_sources(request: HttpRequest, domain: Domain | None) -> list[dict]:
    """The sources with the most failed logins in the last 24 hours, in the user's scope."""
    recent = scopes.visible_to(actor_of(request), AuthFailure).filter(
        created_at__gte=timezone.now() - TOP_SOURCES_WINDOW
    )
    if domain is not None:
        recent = recent.filter(domain=domain)
    grouped = recent.values("source").annotate(
        failures=Count("id"), names=Count("username", distinct=True), last_seen=Max("created_at")
    )
    return list(grouped.order_by("-failures", "source")[:TOP_SOURCES])


def _check_address_scope(request: HttpRequest, address: str) -> None:
    """A domain administrator may look up only names in their own domains (404 otherwise, as for
    any object outside their scope)."""
    if not address or actor_of(request).all_domains:
        return
    domain = domain_of_login(address)
    if domain is None:
        raise Http404
    domain_or_404(request, domain)


def history_view(request: HttpRequest, site: AdminSite) -> HttpResponse:
    form = HistoryFilters(request.GET)
    if not form.is_valid():
        return HttpResponseBadRequest(" ".join(error for errors in form.errors.values() for error in errors))
    filters = form.cleaned_data
    require(request, PERMISSIONS[filters["kind"]])
    _check_address_scope(request, filters["address"])
    domain = domain_or_404(request, filters["domain"])
    kind = KINDS[filters["kind"]]
    rows = history_rows(request, filters, domain)
    rows, older, newer = page_of(rows, kind, filters["before"], filters["after"])
    kept = {
        key: value
        for key, value in request.GET.items()
        if key in HistoryFilters.base_fields and key not in ("before", "after") and value
    }
    # Reasons differ between the kinds: a tab keeps every filter but the reason.
    tabs = {name: urlencode({**kept, "kind": name, "reason": ""}) for name in KINDS}
    may_see_failures = request.user.has_perm(PERMISSIONS[FAILURES])
    return render(
        request,
        site,
        "admin/console/history.html",
        _("History"),
        form=form,
        kind=filters["kind"],
        rows=rows,
        older=older and urlencode({**kept, "before": cursor_of(rows[-1], kind)}),
        newer=newer and rows and urlencode({**kept, "after": cursor_of(rows[0], kind)}),
        kinds=tabs,
        mailbox=mailbox_in_scope(request, filters["address"]) if filters["address"] else None,
        top_sources=top_failing_sources(request, domain) if may_see_failures else None,
        end_reasons=Pop3Session.EndReason.choices,
        failure_reasons=[failure.value for failure in LoginFailure],
    )
