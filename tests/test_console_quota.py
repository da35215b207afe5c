"""The quota page: bars and % used from one SQL expression, its filters and order, the domains'
totals, the CSV, the recount, and a domain administrator's view of it all."""

import pytest
from asgiref.sync import async_to_sync
from django.contrib.auth import get_user_model
from django.test import AsyncClient, Client
from hypothesis import given
from hypothesis import strategies as st

from mailadmin.hosting import services
from mailadmin.hosting.actors import Actor
from mailadmin.mailin.delivery import deliver
from mailadmin.models import AuditEntry, Domain, Mailbox
from mailadmin.units import usage_percent, usage_percent_sql

pytestmark = pytest.mark.django_db

QUOTA = "/admin/quota/"
CSV = "/admin/quota/csv/"
RECOUNT = "/admin/quota/recalculate/"


def mailbox(address: str, *, quota_bytes: int = 0, quota_messages: int = 0, used_bytes=0, used_messages=0):
    """A mailbox whose counters say it uses this much (the page reads counters, not messages)."""
    quotas = {"quota_bytes": quota_bytes, "quota_messages": quota_messages}
    made = services.create_mailbox(Actor.cli(), address, password="a long test passphrase", **quotas).mailbox
    Mailbox.objects.filter(pk=made.pk).update(used_bytes=used_bytes, used_messages=used_messages)
    return made


@pytest.fixture
def usage(domains):
    """Mailboxes at known percentages of their quotas."""
    mailbox("full@ours.test", quota_bytes=1000, used_bytes=1000)  # 100 %
    mailbox("edge@ours.test", quota_bytes=1000, used_bytes=800)  # exactly 80 %
    mailbox("below@ours.test", quota_bytes=1000, used_bytes=799)  # 79.9 %: 79 %
    mailbox("count@ours.test", quota_bytes=1000, used_bytes=100, quota_messages=100, used_messages=96)  # 96 %
    mailbox("free@ours.test", used_bytes=5000, used_messages=7)  # unlimited
    mailbox("half@theirs.test", quota_bytes=1000, used_bytes=500)  # 50 %


def download_csv(user, filters: dict | None = None) -> list[bytes]:
    """The CSV's chunks as an ASGI server gets them: from the response's async iterator."""

    async def download() -> list[bytes]:
        client = AsyncClient()
        await client.aforce_login(user)
        response = await client.get(CSV, filters or {})
        assert response["Content-Type"] == "text/csv; charset=utf-8"
        return [chunk async for chunk in response.streaming_content]

    return async_to_sync(download)()


def addresses(response) -> list[str]:
    assert response.status_code == 200, response.status_code
    return [row.address for row in response.context["rows"]]


@given(used=st.integers(0, 10**15), quota=st.integers(0, 10**13))
def test_the_sql_percentage_is_the_python_one(used, quota):
    found = Domain.objects.annotate(percent=usage_percent_sql("used_bytes", "quota_bytes"))
    domain, _ = Domain.objects.get_or_create(name="percent.test")
    Domain.objects.filter(pk=domain.pk).update(used_bytes=used, quota_bytes=quota)
    assert found.get(pk=domain.pk).percent == usage_percent(used, quota)


def test_mailboxes_are_sorted_by_the_fuller_quota_fullest_first_and_unlimited_last(root_client, usage):
    assert addresses(root_client.get(QUOTA)) == [
        "full@ours.test",
        "count@ours.test",
        "edge@ours.test",
        "below@ours.test",
        "half@theirs.test",
        "free@ours.test",
    ]
    assert addresses(root_client.get(QUOTA, {"o": "used"})) == [
        "free@ours.test",
        "half@theirs.test",
        "below@ours.test",
        "edge@ours.test",
        "count@ours.test",
        "full@ours.test",
    ]
    assert addresses(root_client.get(QUOTA, {"o": "-address"}))[:2] == ["half@theirs.test", "full@ours.test"]


def test_a_later_page_continues_the_order(root_client, usage, monkeypatch):
    from mailadmin.console import quota

    monkeypatch.setattr(quota, "PAGE_SIZE", 2)
    assert addresses(root_client.get(QUOTA, {"page": "2"})) == ["edge@ours.test", "below@ours.test"]
    last = root_client.get(QUOTA, {"page": "3", "o": "used"})
    assert addresses(last) == ["count@ours.test", "full@ours.test"]
    page = root_client.get(QUOTA, {"page": "2", "over": "80"}).content.decode()
    assert '<a href="?over=80&amp;page=1">' in page


def test_over_80_and_over_95_pick_mailboxes_at_or_above_either_quota(root_client, usage):
    assert set(addresses(root_client.get(QUOTA, {"over": "80"}))) == {
        "full@ours.test",
        "count@ours.test",
        "edge@ours.test",
    }
    assert set(addresses(root_client.get(QUOTA, {"over": "95"}))) == {"full@ours.test", "count@ours.test"}
    assert root_client.get(QUOTA, {"over": "50"}).status_code == 400


def test_each_row_has_a_bar_per_quota_and_says_unlimited(root_client, usage):
    page = root_client.get(QUOTA, {"over": "95"}).content.decode()
    assert '<meter min="0" max="100" low="80" high="95" optimum="0" value="96">96 %</meter>' in page
    assert "96 / 100 (96 %)" in page
    assert "100 B / 1000 B (10 %)" in page
    page = root_client.get(QUOTA, {"o": "used"}).content.decode()
    assert "4.9 KiB, unlimited" in page and "7, unlimited" in page


def test_a_mailbox_over_a_lowered_quota_shows_its_percentage_with_a_full_bar(root_client, domains):
    mailbox("over@ours.test", quota_bytes=1000, used_bytes=1500)
    page = root_client.get(QUOTA).content.decode()
    assert 'value="100">150 %</meter>' in page


def test_domains_show_their_totals_against_their_cap(root_client, usage):
    Domain.objects.filter(name="ours.test").update(used_bytes=786432)  # 75 % of 1 MiB
    Domain.objects.filter(name="theirs.test").update(used_bytes=500)
    response = root_client.get(QUOTA)
    rows = [(d.name, d.mailbox_count, d.messages, d.cap_percent) for d in response.context["domains"]]
    assert rows == [("ours.test", 5, 103, 75), ("theirs.test", 1, 0, 0)]
    assert "768.0 KiB / 1.0 MiB (75 %)" in response.content.decode()


@pytest.mark.django_db(transaction=True)  # the CSV is read on threads of its own
def test_the_csv_has_every_row_of_the_filter(root_client, usage):
    root = get_user_model().objects.get(username="root")
    assert b"".join(download_csv(root, {"over": "80"})).decode().splitlines() == [
        "address,domain,used_bytes,quota_bytes,bytes_percent,used_messages,quota_messages,messages_percent",
        "count@ours.test,ours.test,100,1000,10,96,100,96",
        "edge@ours.test,ours.test,800,1000,80,0,0,",
        "full@ours.test,ours.test,1000,1000,100,0,0,",
    ]


@pytest.mark.django_db(transaction=True)  # the CSV is read on threads of its own
def test_the_csv_streams_chunk_by_chunk_under_asgi_and_misses_no_row(domains, monkeypatch):
    from mailadmin.console import quota

    monkeypatch.setattr(quota, "CSV_CHUNK_ROWS", 2)
    for n in range(5):
        mailbox(f"m{n}@ours.test", used_bytes=n)
    root = get_user_model().objects.create_superuser("root", "root@example.test", "pw")
    chunks = download_csv(root)
    assert [chunk.decode().count("\n") for chunk in chunks] == [1, 2, 2, 1]
    lines = b"".join(chunks).decode().splitlines()
    assert [line.split(",")[0] for line in lines] == ["address", *(f"m{n}@ours.test" for n in range(5))]


def test_recount_reports_the_drift_and_corrects_it(root_client, domains):
    made = mailbox("a@ours.test")
    deliver([made.address], [b"Subject: x\n\nhello\n"])
    actual = Mailbox.objects.get(pk=made.pk).used_bytes
    Mailbox.objects.filter(pk=made.pk).update(used_bytes=1)
    response = root_client.post(RECOUNT, {"domain": ""}, follow=True)
    shown = [str(message) for message in response.context["messages"]]
    assert shown == [
        "Counters recounted: 1 counter had drifted and was corrected.",
        f"a@ours.test used_bytes: recorded 1, actual {actual}",
    ]
    assert Mailbox.objects.get(pk=made.pk).used_bytes == actual
    entry = AuditEntry.objects.get(action="recalculate quota")
    assert (entry.actor_name, entry.object_name) == ("root", "a@ours.test")
    response = root_client.post(RECOUNT, {"domain": "ours.test"}, follow=True)
    assert [str(message) for message in response.context["messages"]] == ["Counters recounted: no drift."]
    assert response.redirect_chain == [("/admin/quota/?domain=ours.test", 302)]


def test_recount_needs_post_csrf_and_its_own_permission(plain_staff_client, domains, client):
    from django.contrib.auth.models import Permission

    made = mailbox("a@ours.test")
    Mailbox.objects.filter(pk=made.pk).update(used_bytes=7)
    sam = plain_staff_client.get(QUOTA).wsgi_request.user
    sam.user_permissions.add(Permission.objects.get(codename="view_mailbox"))
    assert plain_staff_client.get(QUOTA).status_code == 200
    assert "Recount" not in plain_staff_client.get(QUOTA).content.decode()
    assert plain_staff_client.post(RECOUNT, {"domain": ""}).status_code == 403
    assert Mailbox.objects.get(pk=made.pk).used_bytes == 7
    sam.user_permissions.add(Permission.objects.get(codename="recalculate_quota"))
    assert plain_staff_client.get(RECOUNT).status_code == 405
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(sam)
    assert strict.post(RECOUNT, {"domain": ""}).status_code == 403
    assert Mailbox.objects.get(pk=made.pk).used_bytes == 7


def test_the_page_needs_staff_and_the_view_permission(client, plain_staff_client):
    assert plain_staff_client.get(QUOTA).status_code == 403
    assert plain_staff_client.get(CSV).status_code == 403
    anonymous = Client()
    assert anonymous.get(QUOTA)["Location"].startswith("/admin/login/")


# --- A domain administrator --------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)  # the CSV is read on threads of its own
def test_a_domain_administrator_sees_only_their_domains(ours_client, usage):
    assert "half@theirs.test" not in addresses(ours_client.get(QUOTA))
    assert len(addresses(ours_client.get(QUOTA))) == 5
    assert [d.name for d in ours_client.get(QUOTA).context["domains"]] == ["ours.test"]
    csv_text = b"".join(download_csv(get_user_model().objects.get(username="olivia"))).decode()
    assert "theirs.test" not in csv_text and csv_text.count("\n") == 6


@pytest.mark.parametrize("name", ["theirs.test", "nowhere.test", "not a domain"])
def test_a_domain_administrator_gets_404_for_any_other_domain(ours_client, usage, name):
    for url in (QUOTA, CSV):
        assert ours_client.get(url, {"domain": name}).status_code == 404
        assert ours_client.get(url, {"domain": name, "over": "80"}).status_code == 404
    assert ours_client.post(RECOUNT, {"domain": name}).status_code == 404


def test_a_domain_administrators_recount_touches_only_their_domains(ours_client, usage):
    Mailbox.objects.update(used_bytes=3)
    response = ours_client.post(RECOUNT, {"domain": ""}, follow=True)
    assert response.status_code == 200
    assert Mailbox.objects.get(user__username="half@theirs.test").used_bytes == 3
    assert set(Mailbox.objects.filter(domain__name="ours.test").values_list("used_bytes", flat=True)) == {0}
    assert not AuditEntry.objects.filter(action="recalculate quota", domain_name="theirs.test").exists()


def test_a_domain_administrator_opens_no_mailbox_of_another_domain(ours_client, usage):
    theirs = Mailbox.objects.get(user__username="half@theirs.test")
    assert ours_client.get(f"/admin/mailadmin/mailbox/{theirs.pk}/change/").status_code == 404


def test_the_recount_service_refuses_tokens_and_people_without_its_permission(domains):
    Mailbox.objects.filter(pk=mailbox("a@ours.test").pk).update(used_bytes=7)
    sam = get_user_model().objects.create_user("sam", password="pw", is_staff=True)
    for actor in (Actor.token("all domains", domain_ids=None), Actor.for_user(sam)):
        with pytest.raises(services.NotPermitted):
            services.recalculate_quota(actor)
    assert Mailbox.objects.get(user__username="a@ours.test").used_bytes == 7
    drifts = services.recalculate_quota(Actor.cli(), domain_name="ours.test")
    assert [(drift.subject, drift.counter, drift.recorded, drift.actual) for drift in drifts] == [
        ("a@ours.test", "used_bytes", 7, 0)
    ]
