"""The quota page: every mailbox's use of its quotas, the domains' totals against their caps, the
same rows as CSV, and the recount of the counters (``recalcquota``) for the user's scope.

"% used" is ``Mailbox.objects.with_usage()`` everywhere here (bars, filters, sorting, CSV):
one SQL expression, indexed, so a page of 100,000 mailboxes is sorted and cut in the database.
"""

import csv
import io
from collections.abc import AsyncIterator, Iterable
from urllib.parse import urlencode

from django import forms
from django.contrib import messages
from django.contrib.admin import AdminSite
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db.models import Count, F, QuerySet, Sum
from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest, QueryDict, StreamingHttpResponse
from django.shortcuts import redirect
from django.urls import reverse
from django.utils.translation import gettext as _
from django.utils.translation import ngettext
from django.views.decorators.http import require_POST

from mailadmin.admin import actor_of, domain_or_404
from mailadmin.console.pages import render, require
from mailadmin.executors import BoundedExecutor
from mailadmin.hosting import scopes, services, store
from mailadmin.models import Domain, Mailbox
from mailadmin.units import usage_percent_sql

PAGE_SIZE = 100
DOMAIN_PAGE_SIZE = 20
CSV_CHUNK_ROWS = 2000
# Drifts listed in the page's message; the audit log keeps every one.
DRIFTS_SHOWN = 20
VIEW_PERMISSION = "mailadmin.view_mailbox"
ORDERINGS = {
    "-used": ("-used_rank", "-id"),
    "used": ("used_rank", "id"),
    "address": ("user__username",),
    "-address": ("-user__username",),
}
CSV_COLUMNS = (
    "address",
    "domain",
    "used_bytes",
    "quota_bytes",
    "bytes_percent",
    "used_messages",
    "quota_messages",
    "messages_percent",
)
# Database work of CSV downloads, off the event loop (they stream from an async iterator).
csv_executor = BoundedExecutor(2, "console-csv")


class QuotaFilters(forms.Form):
    domain = forms.CharField(required=False)
    over = forms.TypedChoiceField(
        choices=[("80", "80"), ("95", "95")], coerce=int, empty_value=None, required=False
    )
    o = forms.ChoiceField(choices=[(key, key) for key in ORDERINGS], required=False)


def mailbox_rows(request: HttpRequest, filters: dict, domain: Domain | None) -> QuerySet[Mailbox]:
    """The mailboxes the page (and its CSV) shows: in scope, filtered, with their usage."""
    rows = scopes.visible_to(actor_of(request), Mailbox).with_usage()
    if domain is not None:
        rows = rows.filter(domain=domain)
    if filters["over"] is not None:
        rows = rows.using_at_least(filters["over"])
    return rows


def page_rows(rows: QuerySet[Mailbox], page) -> QuerySet[Mailbox]:
    """The page's mailboxes with their logins and domains. The page's ids are cut from ``rows``
    alone, which the ranking index serves at any offset; joined first, a deep page would sort
    every mailbox."""
    return rows.filter(pk__in=page.object_list).select_related("user", "domain")


def domain_totals(request: HttpRequest, domain: Domain | None) -> QuerySet[Domain]:
    """The domains in scope (or the one filtered on), fullest against their cap first."""
    domains = scopes.visible_to(actor_of(request), Domain)
    if domain is not None:
        domains = domains.filter(pk=domain.pk)
    domains = domains.annotate(cap_percent=usage_percent_sql("used_bytes", "quota_bytes"))
    return domains.order_by(F("cap_percent").desc(nulls_last=True), "name")


def with_mailbox_totals(domains: Iterable[Domain]) -> list[Domain]:
    """Each domain of a page with ``mailbox_count`` and ``messages``, counted for that page only."""
    domains = list(domains)
    totals = {
        row["domain"]: row
        for row in Mailbox.objects.filter(domain__in=domains)
        .values("domain")
        .annotate(mailbox_count=Count("id"), messages=Sum("used_messages"))
    }
    for domain in domains:
        found = totals.get(domain.pk, {})
        domain.mailbox_count, domain.messages = found.get("mailbox_count", 0), found.get("messages") or 0
    return domains


def _filters(data: QueryDict) -> dict | None:
    form = QuotaFilters(data)
    return form.cleaned_data if form.is_valid() else None


def quota_view(request: HttpRequest, site: AdminSite) -> HttpResponse:
    require(request, VIEW_PERMISSION)
    filters = _filters(request.GET)
    if filters is None:
        return HttpResponseBadRequest(_("Unknown filter value."))
    order = filters["o"] or "-used"
    domain = domain_or_404(request, filters["domain"])
    rows = mailbox_rows(request, filters, domain).order_by(*ORDERINGS[order])
    mailboxes = Paginator(rows.values_list("pk", flat=True), PAGE_SIZE).get_page(request.GET.get("page"))
    domains = Paginator(domain_totals(request, domain), DOMAIN_PAGE_SIZE).get_page(request.GET.get("dpage"))
    kept = {key: value for key, value in request.GET.items() if key in ("domain", "over", "o") and value}
    return render(
        request,
        site,
        "admin/console/quota.html",
        _("Quota"),
        mailboxes=mailboxes,
        rows=page_rows(rows, mailboxes),
        domains=with_mailbox_totals(domains),
        domain_page=domains,
        filters=filters,
        order=order,
        query_string=urlencode(kept),
        sort_links=_sort_links(kept, order),
        may_recalculate=services.may_recalculate_quota(actor_of(request)),
    )


def _sort_links(kept: dict, order: str) -> dict[str, str]:
    """A column's link sorts by it, or reverses its order when the page is already sorted by it."""
    flipped = {"address": "-address", "-address": "address", "-used": "used", "used": "-used"}
    links = {"address": "address", "used": "-used"}
    for column, first in links.items():
        chosen = flipped[order] if order.lstrip("-") == column else first
        links[column] = urlencode({**kept, "o": chosen})
    return links


def quota_csv_view(request: HttpRequest, site: AdminSite) -> HttpResponse:
    """The page's rows, every one, as CSV: streamed chunk by chunk, never held whole.

    The column names are a data format scripts read, so they are not translated.
    """
    require(request, VIEW_PERMISSION)
    filters = _filters(request.GET)
    if filters is None:
        return HttpResponseBadRequest(_("Unknown filter value."))
    domain = domain_or_404(request, filters["domain"])
    columns = ("user__username", "domain__name", *CSV_COLUMNS[2:])
    rows = mailbox_rows(request, filters, domain).values_list(*columns)
    response = StreamingHttpResponse(_csv_lines(rows), content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = 'attachment; filename="quota.csv"'
    return response


async def _csv_lines(rows: QuerySet) -> AsyncIterator[str]:
    """CSV text in chunks of rows read by address (the login name is unique, so each chunk
    starts where the last ended, from the index), each chunk read on the CSV executor."""
    yield _csv_text([CSV_COLUMNS])
    last = ""
    while True:
        chunk = await csv_executor.run(_chunk_after, rows, last)
        if not chunk:
            return
        yield _csv_text(chunk)
        last = chunk[-1][0]


def _chunk_after(rows: QuerySet, last: str) -> list[tuple]:
    return list(rows.filter(user__username__gt=last).order_by("user__username")[:CSV_CHUNK_ROWS])


def _csv_text(rows: Iterable[Iterable]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    return buffer.getvalue()


@require_POST
def recalculate_view(request: HttpRequest, site: AdminSite) -> HttpResponse:
    """Recount the counters of the domain filtered on (or of every mailbox in scope) and say what
    drifted; the service checks the permission and the scope, and audits each fix."""
    filters = _filters(request.POST)
    if filters is None:
        return HttpResponseBadRequest(_("Unknown filter value."))
    domain = domain_or_404(request, filters["domain"])
    try:
        drifts = services.recalculate_quota(
            actor_of(request), domain_name=domain.name if domain is not None else None
        )
    except services.NotPermitted:
        raise PermissionDenied from None
    _report(request, drifts)
    query = urlencode({"domain": domain.name}) if domain is not None else ""
    return redirect(f"{reverse('admin:quota')}?{query}" if query else reverse("admin:quota"))


def _report(request: HttpRequest, drifts: list[store.Drift]) -> None:
    if not drifts:
        messages.success(request, _("Counters recounted: no drift."))
        return
    summary = ngettext(
        "Counters recounted: %(count)d counter had drifted and was corrected.",
        "Counters recounted: %(count)d counters had drifted and were corrected.",
        len(drifts),
    ) % {"count": len(drifts)}
    messages.warning(request, summary)
    for drift in drifts[:DRIFTS_SHOWN]:
        detail = _("%(subject)s %(counter)s: recorded %(recorded)d, actual %(actual)d") % {
            "subject": drift.subject,
            "counter": drift.counter,
            "recorded": drift.recorded,
            "actual": drift.actual,
        }
        messages.warning(request, detail)
    if len(drifts) > DRIFTS_SHOWN:
        rest = len(drifts) - DRIFTS_SHOWN
        messages.warning(request, _("and %(count)d more (see the audit log)") % {"count": rest})
