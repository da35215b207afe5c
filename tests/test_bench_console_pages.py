"""The console bench's seeding: every table's rows as its docstring says, on either database."""

import pytest
from django.db.models import Sum

from bench.console_pages import Sizes, seed
from mailadmin.models import AuthFailure, Domain, Mailbox, Pop3Session


@pytest.mark.django_db(transaction=True)  # VACUUM runs outside any transaction
def test_seeding_makes_the_rows_the_pages_are_measured_on():
    sizes = Sizes(mailboxes=30, mailboxes_per_domain=10, sessions=200, failures=40, requests=1)
    seed(sizes)
    assert Domain.objects.count() == 3
    assert Mailbox.objects.count() == 30 and Pop3Session.objects.count() == 200
    assert AuthFailure.objects.count() == 40
    mailbox = Mailbox.objects.select_related("user", "domain").get(user__username="u12@c1.bench.test")
    assert (mailbox.domain.name, mailbox.quota_bytes, mailbox.used_bytes) == (
        "c1.bench.test",
        100 * 1024**2,
        12 * 7919 % 101 * 1024**2,
    )
    assert Mailbox.objects.get(user__username="u9@c0.bench.test").quota_bytes == 0  # every tenth
    domain = Domain.objects.get(name="c1.bench.test")
    total = Mailbox.objects.filter(domain=domain).aggregate(total=Sum("used_bytes"))["total"]
    assert domain.used_bytes == total
    newest = Pop3Session.objects.order_by("-started_at").first()
    assert newest.username == "u0@c0.bench.test" and newest.mailbox.address == newest.username
    assert newest.domain_id == newest.mailbox.domain_id
    reasons = set(Pop3Session.objects.values_list("end_reason", flat=True))
    assert reasons == {"quit", "timeout", "dropped", "kicked"}
    failure = AuthFailure.objects.order_by("created_at").last()
    assert failure.username.startswith("nobody") and failure.domain_id is None  # the newest: n = 0
