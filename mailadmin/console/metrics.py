"""``/metrics`` in the Prometheus text format, read from the shared database at scrape time.

Every runpop3 and runlmtp process, on every host, writes to the one database, so one scrape of
any web process gives the figures of all of them: no per-process registry to sum, and no
multiprocess directory. The collector runs a handful of indexed queries per scrape.

Activity counters (sessions, logins, retrievals, deliveries) count the current UTC hour and
start again from zero at the next one (each carries the hour's start as its ``_created``), so
``rate()`` and ``increase()`` see an hourly counter reset, as after a restart. Off (404) unless
``MAILADMIN_METRICS_TOKEN`` is set; then it needs ``Authorization: Bearer <token>``.
"""

import hmac

from django.conf import settings
from django.http import Http404, HttpRequest, HttpResponse
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_safe
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from mailadmin.console import figures
from mailadmin.hosting.actors import Actor
from mailadmin.hosting.figures import hour_of
from mailadmin.models import DeliveryFigures

# (metric name, help, column of the session figures)
SESSION_COUNTERS = (
    ("mailadmin_pop3_sessions", "POP3 sessions started this hour.", "sessions"),
    ("mailadmin_pop3_logins", "Successful POP3 logins, in sessions started this hour.", "logins"),
    ("mailadmin_pop3_failed_logins", "Failed POP3 logins this hour.", "failed_logins"),
    (
        "mailadmin_pop3_retrieved_messages",
        "Messages sent by RETR, in sessions started this hour.",
        "retr_messages",
    ),
    ("mailadmin_pop3_retrieved_bytes", "Bytes sent by RETR, in sessions started this hour.", "retr_bytes"),
)


class ConsoleCollector(Collector):
    """The figures ``actor`` may see (the metrics token sees every domain)."""

    def __init__(self, actor: Actor) -> None:
        self.actor = actor

    def collect(self):
        now = timezone.now()
        hour = hour_of(now)
        created = hour.timestamp()
        yield GaugeMetricFamily(
            "mailadmin_pop3_sessions_open", "POP3 sessions open now.", value=figures.open_sessions(self.actor)
        )
        totals = figures.session_totals_since(self.actor, hour)
        for name, documentation, column in SESSION_COUNTERS:
            yield CounterMetricFamily(name, documentation, value=totals[column], created=created)
        yield from self._deliveries(hour, created)
        used = GaugeMetricFamily(
            "mailadmin_domain_used_bytes", "Bytes stored in the domain.", labels=["domain"]
        )
        quota = GaugeMetricFamily(
            "mailadmin_domain_quota_bytes", "The domain's cap on stored bytes; 0 = none.", labels=["domain"]
        )
        for name, used_bytes, quota_bytes in figures.domain_usage(self.actor):
            used.add_metric([name], used_bytes)
            quota.add_metric([name], quota_bytes)
        yield used
        yield quota
        if self.actor.all_domains:
            alive = GaugeMetricFamily(
                "mailadmin_processes_alive", "Server processes with a fresh heartbeat.", labels=["command"]
            )
            for command, count in sorted(figures.alive_processes(now).items()):
                alive.add_metric([command], count)
            yield alive

    def _deliveries(self, hour, created: float):
        outcomes = figures.deliveries_since(self.actor, hour)
        messages, size_bytes = outcomes.pop(DeliveryFigures.DELIVERED, (0, 0))
        yield CounterMetricFamily(
            "mailadmin_delivered_messages",
            "Messages stored by delivery this hour.",
            value=messages,
            created=created,
        )
        yield CounterMetricFamily(
            "mailadmin_delivered_bytes",
            "Bytes stored by delivery this hour.",
            value=size_bytes,
            created=created,
        )
        refused = CounterMetricFamily(
            "mailadmin_deliveries_refused", "Recipients refused this hour, by reason.", labels=["reason"]
        )
        for reason, (count, _) in sorted(outcomes.items()):
            refused.add_metric([reason], count, created=created)
        yield refused


def exposition(actor: Actor) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ConsoleCollector(actor))
    return generate_latest(registry)


def bearer_token_matches(request: HttpRequest, token: str) -> bool:
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


@never_cache
@require_safe
def metrics(request: HttpRequest) -> HttpResponse:
    token = settings.MAILADMIN_METRICS_TOKEN
    if not token:
        raise Http404("metrics are off")
    if not bearer_token_matches(request, token):
        response = HttpResponse("a bearer token is needed\n", status=401, content_type="text/plain")
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    actor = Actor.token("metrics", domain_ids=None, client_address=request.META.get("REMOTE_ADDR", ""))
    return HttpResponse(exposition(actor), content_type=CONTENT_TYPE_LATEST)
