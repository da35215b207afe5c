"""``/healthz`` and ``/metrics``: the test client, and curl against a daphne child as a real peer."""

import shutil
import subprocess
import sys
from datetime import timedelta

import pytest
from django.db import OperationalError
from django.utils import timezone
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from mailadmin.console.metrics import exposition
from mailadmin.hosting import services
from mailadmin.hosting.actors import Actor
from mailadmin.hosting.figures import add_deliveries
from mailadmin.models import AuthFailure, Domain, LmtpNode, Pop3Node
from tests.conftest import PROJECT_DIR, child_environment, open_session_row
from tests.daemons import HOST, free_port
from tests.pop3_server import wait_for

TOKEN = "s3cret-metrics-token"
CURL = shutil.which("curl")


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a Prometheus text exposition, keyed by name and sorted labels."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.name.endswith("_created")
    }


# --- /healthz --------------------------------------------------------------------------------


@pytest.mark.django_db
def test_healthz_answers_200_while_the_database_answers(client):
    response = client.get("/healthz")
    assert (response.status_code, response.content) == (200, b"ok\n")


@pytest.mark.django_db
def test_healthz_answers_503_when_the_database_fails(client, monkeypatch):
    def broken(*args, **kwargs):
        raise OperationalError("connection refused")

    monkeypatch.setattr("django.db.backends.base.base.BaseDatabaseWrapper.cursor", broken)
    response = client.get("/healthz")
    assert (response.status_code, response.content) == (503, b"database unavailable\n")


# --- /metrics --------------------------------------------------------------------------------


@pytest.mark.django_db
def test_metrics_are_off_without_a_token(client, settings):
    settings.MAILADMIN_METRICS_TOKEN = ""
    assert client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}").status_code == 404


@pytest.mark.django_db
@pytest.mark.parametrize(
    "authorization", [None, "Bearer wrong", f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer"]
)
def test_metrics_need_the_bearer_token(client, settings, authorization):
    settings.MAILADMIN_METRICS_TOKEN = TOKEN
    headers = {} if authorization is None else {"HTTP_AUTHORIZATION": authorization}
    response = client.get("/metrics", **headers)
    assert response.status_code == 401
    assert response["WWW-Authenticate"] == 'Bearer realm="metrics"'


@pytest.fixture
def activity(make_mailbox):
    """This hour in a.test and b.test: sessions, a failed login, deliveries, refusals, usage."""
    alice, bob = make_mailbox("alice@a.test"), make_mailbox("bob@b.test")
    now = timezone.now()
    open_session_row(alice, authenticated_at=now, retr_count=2, retr_bytes=300)
    open_session_row(bob, authenticated_at=now, retr_count=1, retr_bytes=70)
    open_session_row(bob, ended_at=now, end_reason="quit")  # never logged in
    AuthFailure.objects.create(
        created_at=now,
        username="bob@b.test",
        domain=bob.domain,
        peer_host="h",
        source="h",
        mechanism="USER",
        reason="bad credentials",
    )
    add_deliveries(
        [(alice.domain_id, 1000), (bob.domain_id, 500), (bob.domain_id, 5)],
        [(bob.domain_id, "over_quota")],
        {},
    )
    Domain.objects.filter(pk=alice.domain_id).update(used_bytes=1234, quota_bytes=10_000)
    Pop3Node.objects.create(name="h:1", started_at=now, heartbeat_at=now)
    Pop3Node.objects.create(name="h:2", started_at=now, heartbeat_at=now)
    LmtpNode.objects.create(name="h:3", started_at=now, heartbeat_at=now - timedelta(hours=1))  # lapsed
    return alice, bob


@pytest.mark.django_db
def test_metrics_give_the_figures_of_the_shared_database(client, settings, activity):
    settings.MAILADMIN_METRICS_TOKEN = TOKEN
    response = client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
    assert response.status_code == 200
    assert response["Content-Type"] == CONTENT_TYPE_LATEST == "text/plain; version=1.0.0; charset=utf-8"
    values = samples(response.content.decode())
    assert values == {
        ("mailadmin_pop3_sessions_open", ()): 2,
        ("mailadmin_pop3_sessions_total", ()): 3,
        ("mailadmin_pop3_logins_total", ()): 2,
        ("mailadmin_pop3_failed_logins_total", ()): 1,
        ("mailadmin_pop3_retrieved_messages_total", ()): 3,
        ("mailadmin_pop3_retrieved_bytes_total", ()): 370,
        ("mailadmin_delivered_messages_total", ()): 3,
        ("mailadmin_delivered_bytes_total", ()): 1505,
        ("mailadmin_deliveries_refused_total", (("reason", "over_quota"),)): 1,
        ("mailadmin_domain_used_bytes", (("domain", "a.test"),)): 1234,
        ("mailadmin_domain_used_bytes", (("domain", "b.test"),)): 0,
        ("mailadmin_domain_quota_bytes", (("domain", "a.test"),)): 10_000,
        ("mailadmin_domain_quota_bytes", (("domain", "b.test"),)): 0,
        ("mailadmin_processes_alive", (("command", "runlmtp"),)): 0,
        ("mailadmin_processes_alive", (("command", "runpop3"),)): 2,
    }


@pytest.mark.django_db
def test_the_collector_scoped_to_a_domain_administrator_shows_nothing_of_other_domains(activity):
    alice, _ = activity
    olivia = Actor.token("olivia", domain_ids=frozenset({alice.domain_id}))
    values = samples(exposition(olivia).decode())
    assert values == {
        ("mailadmin_pop3_sessions_open", ()): 1,
        ("mailadmin_pop3_sessions_total", ()): 1,
        ("mailadmin_pop3_logins_total", ()): 1,
        ("mailadmin_pop3_failed_logins_total", ()): 0,
        ("mailadmin_pop3_retrieved_messages_total", ()): 2,
        ("mailadmin_pop3_retrieved_bytes_total", ()): 300,
        ("mailadmin_delivered_messages_total", ()): 1,
        ("mailadmin_delivered_bytes_total", ()): 1000,
        ("mailadmin_domain_used_bytes", (("domain", "a.test"),)): 1234,
        ("mailadmin_domain_quota_bytes", (("domain", "a.test"),)): 10_000,
    }


# --- A real peer -----------------------------------------------------------------------------


@pytest.fixture
def daphne(tmp_path, transactional_db):
    """daphne serving the project on a free port, against the test database, with a metrics token."""
    port = free_port()
    stderr = (tmp_path / "daphne.stderr").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "daphne", "-b", HOST, "-p", str(port), "mailadmin.asgi:application"],
        cwd=PROJECT_DIR,
        env=child_environment(MAILADMIN_METRICS_TOKEN=TOKEN),
        stdout=subprocess.DEVNULL,
        stderr=stderr,
    )
    try:
        wait_for(lambda: b"Listening on TCP address" in (tmp_path / "daphne.stderr").read_bytes(), timeout=60)
        yield f"http://{HOST}:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)
        stderr.close()


def curl(*arguments: str) -> tuple[int, str]:
    result = subprocess.run(
        [CURL, "-s", "-o", "-", "-w", "\n%{http_code}", *arguments],
        capture_output=True,
        text=True,
        timeout=30,
    )
    body, _, code = result.stdout.rpartition("\n")
    return int(code), body


@pytest.mark.slow
@pytest.mark.skipif(CURL is None, reason="curl is not installed")
def test_curl_reads_healthz_and_metrics_from_daphne(daphne, make_mailbox):
    services.create_domain(Actor.cli(), "c.test", quota_bytes=5000)
    assert curl(f"{daphne}/healthz") == (200, "ok\n")
    assert curl(f"{daphne}/metrics")[0] == 401
    code, body = curl("-H", f"Authorization: Bearer {TOKEN}", f"{daphne}/metrics")
    assert code == 200
    values = samples(body)
    assert values[("mailadmin_domain_quota_bytes", (("domain", "c.test"),))] == 5000
    assert values[("mailadmin_pop3_sessions_open", ())] == 0
