"""The dashboard (the admin's index, extended) and the charts page: doors onto ``figures``."""

from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import NoReverseMatch, reverse
from django.utils import formats, timezone
from django.utils.translation import gettext as _

from mailadmin.console import charts, figures
from mailadmin.hosting.actors import Actor
from mailadmin.hosting.figures import hour_of
from mailadmin.units import format_size

DASHBOARD_CHART_HOURS = 24


def actor_of(request: HttpRequest) -> Actor:
    from mailadmin.admin import actor_of

    return actor_of(request)


def first_url(*candidates: tuple[str, str]) -> str:
    """The first of (URL name, query) that exists: a page of ours, else an admin list filtered alike."""
    for name, query in candidates:
        try:
            return reverse(name) + query
        except NoReverseMatch:
            continue
    return ""


@dataclass(frozen=True)
class Figure:
    label: str
    value: str
    url: str


def dashboard_context(request: HttpRequest) -> dict:
    actor = actor_of(request)
    now = timezone.now()
    shown = figures.dashboard(actor, now)
    tiles = [
        Figure(
            _("Open POP3 sessions"),
            str(shown.open_sessions),
            first_url(("admin:live_sessions", ""), ("admin:mailadmin_pop3session_changelist", "?state=open")),
        ),
        Figure(
            _("Logins in the last hour"),
            str(shown.logins_last_hour),
            first_url(("admin:history", ""), ("admin:mailadmin_pop3session_changelist", "?state=ended")),
        ),
        Figure(
            _("Failed logins in the last hour"),
            str(shown.failed_logins_last_hour),
            first_url(("admin:mailadmin_authfailure_changelist", "")),
        ),
        Figure(
            _("Retrieved today"),
            format_size(shown.retrieved_bytes_today),
            first_url(("admin:charts", "#retrieved-per-day")),
        ),
        Figure(
            _("Mailboxes over %(percent)d%% of quota") % {"percent": figures.NEAR_FULL_PERCENT},
            str(shown.mailboxes_near_full),
            first_url(
                ("admin:quota", f"?over={figures.NEAR_FULL_PERCENT}"),
                ("admin:mailadmin_mailbox_changelist", "?o=-4"),
            ),
        ),
        Figure(
            _("Domains near their cap"),
            str(shown.domains_near_cap),
            first_url(("admin:mailadmin_domain_changelist", "?o=-4")),
        ),
    ]
    if shown.processes is not None:
        tiles += [
            Figure(
                _("runpop3 processes alive"), str(shown.processes["runpop3"]), first_url(("admin:charts", ""))
            ),
            Figure(
                _("runlmtp processes alive"), str(shown.processes["runlmtp"]), first_url(("admin:charts", ""))
            ),
        ]
    since = hour_of(now - timedelta(hours=DASHBOARD_CHART_HOURS - 1))
    hours = figures.chart_hours(now)[-DASHBOARD_CHART_HOURS:]
    series = figures.hourly(actor, since)
    return {
        "dashboard_figures": tiles,
        "dashboard_charts": [
            sessions_chart(series, hours, small=True),
            failed_logins_chart(series, hours, small=True),
        ],
        "charts_url": first_url(("admin:charts", "")),
    }


def charts_view(site):
    def view(request: HttpRequest) -> HttpResponse:
        actor = actor_of(request)
        now = timezone.now()
        hours = figures.chart_hours(now)
        series = figures.hourly(actor, hours[0])
        context = {
            **site.each_context(request),
            "title": _("Charts"),
            "charts": [
                sessions_chart(series, hours),
                retrieved_chart(series, hours),
                failed_logins_chart(series, hours),
                quota_chart(figures.quota_histogram(actor)),
            ],
        }
        return TemplateResponse(request, "console/charts.html", context)

    return view


# --- The charts ------------------------------------------------------------------------------


def _hour_label(hour: datetime) -> str:
    return formats.date_format(timezone.localtime(hour), "D H:i")


def _day_ticks(hours: list[datetime]) -> dict[int, str]:
    """The x axis of an hourly chart names each local midnight's bar by its day."""
    ticks = {}
    for index, hour in enumerate(hours):
        local = timezone.localtime(hour)
        if local.hour == 0:
            ticks[index] = formats.date_format(local, "D j")
    return ticks


def _hourly_points(
    series: dict[datetime, Counter], hours: list[datetime], column: str
) -> list[tuple[str, int]]:
    return [(_hour_label(hour), series.get(hour, Counter())[column]) for hour in hours]


def sessions_chart(series, hours, *, small: bool = False) -> charts.BarChart:
    return charts.bar_chart(
        "sessions-per-hour",
        _("POP3 sessions per hour"),
        description=_("POP3 sessions started in each hour of the last %(hours)d hours.")
        % {"hours": len(hours)},
        x_label=_("Hour"),
        y_label=_("Sessions"),
        points=_hourly_points(series, hours, "sessions"),
        x_tick_labels=_day_ticks(hours),
        small=small,
    )


def failed_logins_chart(series, hours, *, small: bool = False) -> charts.BarChart:
    return charts.bar_chart(
        "failed-logins-per-hour",
        _("Failed logins per hour"),
        description=_("Failed POP3 logins in each hour of the last %(hours)d hours.") % {"hours": len(hours)},
        x_label=_("Hour"),
        y_label=_("Failed logins"),
        points=_hourly_points(series, hours, "failed_logins"),
        x_tick_labels=_day_ticks(hours),
        small=small,
    )


def retrieved_chart(series, hours) -> charts.BarChart:
    days = figures.per_day(series, hours, "retr_bytes")
    return charts.bar_chart(
        "retrieved-per-day",
        _("Bytes retrieved per day"),
        description=_("Message bytes sent by RETR in sessions started on each of the last %(days)d days.")
        % {"days": len(days)},
        x_label=_("Day"),
        y_label=_("Bytes"),
        points=[(formats.date_format(day, "D j"), value) for day, value in days],
        format_value=format_size,
    )


def quota_chart(histogram: list[tuple[int, int]]) -> charts.BarChart:
    step = figures.HISTOGRAM_STEP_PERCENT

    def bucket(lower: int) -> str:
        if lower >= 100:
            return _("full")
        return f"{lower}–{lower + step - 1} %"

    return charts.bar_chart(
        "quota-use",
        _("Quota use"),
        description=_("Mailboxes with a byte quota, by how much of it they use."),
        x_label=_("Share of quota used"),
        y_label=_("Mailboxes"),
        points=[(bucket(lower), mailboxes) for lower, mailboxes in histogram],
    )
