"""POP3 authentication policy and the session registry, against the real database."""

import asyncio
import dataclasses
import itertools
import logging
import sys
import uuid
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model, hashers
from django.contrib.auth.hashers import make_password
from django.core.management import call_command
from django.db import InterfaceError, OperationalError
from django.utils import timezone

from mailadmin.executors import BoundedExecutor
from mailadmin.hosting import services, store
from mailadmin.hosting.actors import Actor
from mailadmin.mailin.delivery import deliver
from mailadmin.management.commands.runpop3 import auth_policy
from mailadmin.models import AuthFailure, Domain, Mailbox, MaildropLease, Pop3Node, Pop3Session
from mailadmin.pop3d import authenticator as authenticator_module
from mailadmin.pop3d import registry
from mailadmin.pop3d.authenticator import (
    AuthPolicy,
    Pop3Authenticator,
    current_user,
    normalise_login,
    penalty_seconds,
    penalty_source,
)
from mailadmin.pop3d.leases import LeaseKeeper
from pop3.mailbox import LoginFailure, LoginRequest

PASSWORD = "correct horse"


def policy_with(**changes) -> AuthPolicy:
    """runpop3's policy from settings, with the given changes."""
    return dataclasses.replace(auth_policy(), **changes)


def authenticator_on(
    database: BoundedExecutor, hashing: BoundedExecutor, leases: LeaseKeeper | None = None, **policy
) -> Pop3Authenticator:
    leases = leases or LeaseKeeper(database, node="test-node", ttl_seconds=60)
    return Pop3Authenticator(policy_with(**policy), database=database, hashing=hashing, leases=leases)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("  Alice@Example.TEST ", "alice@example.test"),
        ("ＡＬＩＣＥ@example.test", "alice@example.test"),  # NFKC, as Django normalises usernames
        ("", None),
        ("a\x00b@example.test", None),
        ("a b@example.test", None),
        ("x" * 321, None),
    ],
)
def test_login_names_are_normalised_like_django_usernames(given, expected):
    assert normalise_login(given) == expected


@pytest.mark.parametrize(
    ("peer", "source"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2::5", "2001:db8:1::/48"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("fe80::1%eth0", "fe80::/48"),
    ],
)
def test_penalty_groups_ipv6_by_48(peer, source):
    assert penalty_source(peer) == source


def record_sleeps(monkeypatch) -> list[float]:
    """Every asyncio.sleep from now on returns at once, its delay recorded."""
    delays: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(delay: float, result=None):
        delays.append(delay)
        return await real_sleep(0, result)

    monkeypatch.setattr(asyncio, "sleep", sleep)
    return delays


def failure(source: str, attempt: str, *, age_seconds: int = 0, penalised: bool = True) -> None:
    AuthFailure.objects.create(
        created_at=timezone.now() - timedelta(seconds=age_seconds),
        peer_host=source,
        source=source,
        mechanism="USER",
        reason="bad credentials",
        attempt=attempt,
        penalised=penalised,
    )


@pytest.mark.django_db
def test_penalty_doubles_per_distinct_failure_up_to_the_cap():
    policy = policy_with(penalty_max=15.0)
    seen = [penalty_seconds("192.0.2.1", policy)]
    for attempt in "abcd":
        failure("192.0.2.1", attempt)
        seen.append(penalty_seconds("192.0.2.1", policy))
    assert seen == [0.0, 2.0, 4.0, 8.0, 15.0]


@pytest.mark.django_db
def test_repeating_the_same_wrong_password_does_not_grow_the_penalty():
    policy = policy_with()
    for _ in range(5):
        failure("192.0.2.2", "same")
    assert penalty_seconds("192.0.2.2", policy) == 2.0


@pytest.mark.django_db
def test_penalty_ignores_old_failures_other_sources_and_unpenalised_rows():
    policy = policy_with(penalty_window_seconds=900)
    failure("192.0.2.3", "old", age_seconds=1000)
    failure("192.0.2.4", "other")
    failure("192.0.2.3", "locked", penalised=False)
    assert penalty_seconds("192.0.2.3", policy) == 0.0
    assert penalty_seconds("192.0.2.3", policy_with(penalty_max=0)) == 0.0


def login(username: str, password: str, **policy):
    """Run one authentication the way runpop3 does, on real executors."""
    authenticator = authenticator_on(
        BoundedExecutor(2, "test-db"),
        BoundedExecutor(1, "test-hash"),
        failure_delay=0,
        penalty_max=0,
        **policy,
    )
    request = LoginRequest(username, password, "USER", "192.0.2.10", True, uuid.uuid4().hex)
    return asyncio.run(authenticator.authenticate(request))


@pytest.mark.django_db(transaction=True)
def test_good_credentials_lock_the_mailbox_and_snapshot_it(make_mailbox):
    mailbox = make_mailbox("alice@example.test")
    deliver([mailbox.address], [b"Subject: hi\r\n\r\nbody\r\n"])
    result = login("Alice@Example.test", PASSWORD)
    assert result.failure is None
    assert result.username == "alice@example.test"
    assert [info.uidl for info in result.maildrop.messages] == [store.format_uidl(1, mailbox.uid_validity)]
    assert MaildropLease.objects.get().owner == result.maildrop.lease.owner
    second = login("alice@example.test", PASSWORD)
    assert second.failure is LoginFailure.IN_USE
    assert second.maildrop is None


@pytest.mark.django_db(transaction=True)
def test_unknown_user_wrong_password_and_inactive_mailbox_fail_alike(make_mailbox):
    make_mailbox("alice@example.test")
    off = make_mailbox("off@example.test")
    Mailbox.objects.filter(pk=off.pk).update(active=False)
    make_mailbox("bob@closed.test")
    Domain.objects.filter(name="closed.test").update(active=False)
    results = [
        login("alice@example.test", "wrong"),
        login("nobody@example.test", PASSWORD),
        login("off@example.test", PASSWORD),
        login("bob@closed.test", PASSWORD),
        login("bad\x01name", PASSWORD),
    ]
    assert [(r.failure, r.maildrop) for r in results] == [(LoginFailure.BAD_CREDENTIALS, None)] * 5
    rows = list(AuthFailure.objects.order_by("created_at").values_list("username", "reason", "source"))
    assert rows[:4] == [
        ("alice@example.test", "bad credentials", "192.0.2.10"),
        ("nobody@example.test", "bad credentials", "192.0.2.10"),
        ("off@example.test", "bad credentials", "192.0.2.10"),
        ("bob@closed.test", "bad credentials", "192.0.2.10"),
    ]
    assert rows[4] == ("bad?name", "bad credentials", "192.0.2.10")
    assert not MaildropLease.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_a_hash_django_wants_upgraded_is_upgraded_at_login(make_mailbox):
    mailbox = make_mailbox("old@example.test")
    get_user_model().objects.filter(pk=mailbox.user_id).update(
        password=make_password(PASSWORD, hasher="pbkdf2_sha256")
    )
    assert login("old@example.test", PASSWORD).failure is None
    assert get_user_model().objects.get(pk=mailbox.user_id).password.startswith("argon2$")


def open_session_row(mailbox: Mailbox, *, node: str = "test-node", **fields) -> Pop3Session:
    now = timezone.now()
    Pop3Node.objects.update_or_create(name=node, defaults={"started_at": now, "heartbeat_at": now})
    return Pop3Session.objects.create(
        id=uuid.uuid4(),
        node=node,
        mailbox=mailbox,
        username=mailbox.address,
        peer_host="192.0.2.10",
        peer_port=1234,
        local_host="127.0.0.1",
        local_port=110,
        started_at=now,
        authenticated_at=now,
        **fields,
    )


@pytest.mark.django_db(transaction=True)
def test_login_delay_refuses_a_login_too_soon_after_the_last(make_mailbox):
    mailbox = make_mailbox("slow@example.test")
    open_session_row(mailbox, ended_at=timezone.now(), end_reason="quit")
    assert login("slow@example.test", PASSWORD, login_delay_seconds=300).failure is LoginFailure.LOGIN_DELAY
    Pop3Session.objects.update(authenticated_at=timezone.now() - timedelta(seconds=301))
    assert login("slow@example.test", PASSWORD, login_delay_seconds=300).failure is None


@pytest.mark.django_db
def test_monitor_finds_kicked_deactivated_and_repassworded_sessions(make_mailbox):
    boxes = {
        name: make_mailbox(f"{name}@example.test") for name in ("calm", "kicked", "off", "newpass", "gone")
    }
    rows = {name: open_session_row(mailbox) for name, mailbox in boxes.items()}
    tracked = {
        row.pk.hex: type(
            "Drop", (), {"password_fingerprint": registry.password_fingerprint(boxes[name].user.password)}
        )
        for name, row in rows.items()
    }
    assert services.kick_sessions(Actor.cli(), address="kicked@example.test") == 1
    Mailbox.objects.filter(pk=boxes["off"].pk).update(active=False)
    store.set_password("newpass@example.test", "brand-new-horse")
    store.delete_mailbox("gone@example.test")
    doomed = set(registry.sessions_to_end(tracked))
    assert doomed == {rows[name].pk.hex for name in ("kicked", "off", "newpass", "gone")}


@pytest.mark.django_db
def test_sweep_ends_the_sessions_of_processes_that_stopped_heartbeating(make_mailbox):
    mailbox = make_mailbox()
    alive = open_session_row(mailbox, node="alive")
    dead = open_session_row(mailbox, node="dead")
    Pop3Node.objects.filter(name="dead").update(heartbeat_at=timezone.now() - timedelta(minutes=5))
    assert registry.sweep_lost_sessions(interval=1.0) == 1
    dead.refresh_from_db()
    alive.refresh_from_db()
    assert (dead.end_reason, alive.end_reason) == ("lost", "")
    assert list(Pop3Node.objects.values_list("name", flat=True)) == ["alive"]


@pytest.mark.django_db
def test_kickpop3_by_address_and_by_session_id(make_mailbox, capsys):
    mailbox = make_mailbox("k@example.test")
    first = open_session_row(mailbox)
    second = open_session_row(mailbox)
    call_command("kickpop3", str(first.pk))
    assert capsys.readouterr().out == "kick requested for 1 session\n"
    call_command("kickpop3", "K@example.test")
    assert capsys.readouterr().out == "kick requested for 1 session\n"
    assert Pop3Session.objects.filter(kick_requested_at__isnull=False).count() == 2
    second.refresh_from_db()
    assert second.kick_requested_at is not None


@pytest.mark.django_db(transaction=True)
def test_a_locked_mailbox_is_recorded_but_does_not_grow_the_penalty(make_mailbox):
    make_mailbox("busy@example.test")
    assert login("busy@example.test", PASSWORD).failure is None
    assert login("busy@example.test", PASSWORD).failure is LoginFailure.IN_USE
    assert list(AuthFailure.objects.values_list("reason", "penalised")) == [("mailbox in use", False)]
    assert penalty_seconds("192.0.2.10", policy_with()) == 0.0


class CountingHashing(BoundedExecutor):
    """The hashing executor, counting full verifications."""

    def __init__(self) -> None:
        super().__init__(1, "test-hash")
        self.calls = 0

    async def run(self, function, *args):
        self.calls += 1
        return await super().run(function, *args)


def cached_authenticator(ttl: float = 300) -> tuple[Pop3Authenticator, CountingHashing]:
    hashing = CountingHashing()
    database = BoundedExecutor(2, "test-db")
    return authenticator_on(database, hashing, cache_ttl_seconds=ttl, failure_delay=0, penalty_max=0), hashing


def cached_login(authenticator: Pop3Authenticator, username: str, password: str):
    request = LoginRequest(username, password, "USER", "192.0.2.10", True, uuid.uuid4().hex)

    async def attempt():
        result = await authenticator.authenticate(request)
        if result.maildrop is not None:
            await result.maildrop.release()
        return result.failure

    return asyncio.run(attempt())


@pytest.mark.django_db(transaction=True)
def test_warm_logins_skip_the_hash_until_the_password_changes(make_mailbox):
    make_mailbox("warm@example.test")
    authenticator, hashing = cached_authenticator()
    assert [cached_login(authenticator, "warm@example.test", PASSWORD) for _ in range(3)] == [None] * 3
    assert hashing.calls == 1
    assert cached_login(authenticator, "warm@example.test", "wrong") is LoginFailure.BAD_CREDENTIALS
    assert hashing.calls == 2  # a different password is never answered from the cache
    store.set_password("warm@example.test", "another-horse-7")
    assert cached_login(authenticator, "warm@example.test", PASSWORD) is LoginFailure.BAD_CREDENTIALS
    assert cached_login(authenticator, "warm@example.test", "another-horse-7") is None
    assert hashing.calls == 4


@pytest.mark.django_db(transaction=True)
def test_a_cached_login_is_refused_once_the_mailbox_is_disabled(make_mailbox):
    mailbox = make_mailbox("warm@example.test")
    authenticator, hashing = cached_authenticator()
    assert cached_login(authenticator, "warm@example.test", PASSWORD) is None
    Mailbox.objects.filter(pk=mailbox.pk).update(active=False)
    assert cached_login(authenticator, "warm@example.test", PASSWORD) is LoginFailure.BAD_CREDENTIALS


@pytest.mark.django_db(transaction=True)
def test_cache_off_verifies_every_login(make_mailbox):
    make_mailbox("cold@example.test")
    authenticator, hashing = cached_authenticator(ttl=0)
    assert [cached_login(authenticator, "cold@example.test", PASSWORD) for _ in range(2)] == [None, None]
    assert hashing.calls == 2


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("error", [OperationalError, InterfaceError])
def test_database_trouble_is_a_temporary_failure_answered_no_faster_than_a_wrong_password(
    make_mailbox, monkeypatch, error
):
    make_mailbox("t@example.test")

    class BrokenDatabase(BoundedExecutor):
        async def run(self, function, *args):
            raise error("server closed the connection unexpectedly")

    delays = record_sleeps(monkeypatch)
    monkeypatch.setattr(authenticator_module.random, "random", lambda: 0.5)
    authenticator = authenticator_on(BrokenDatabase(1, "broken"), BoundedExecutor(1, "h"), failure_delay=0.2)
    request = LoginRequest("t@example.test", PASSWORD, "USER", "192.0.2.10", True, uuid.uuid4().hex)
    result = asyncio.run(authenticator.authenticate(request))
    assert (result.failure, result.maildrop) == (LoginFailure.TEMPORARY, None)
    assert delays == [pytest.approx(0.25)]  # the failure delay, plus a quarter of it as jitter


@pytest.mark.django_db
def test_usable_means_the_mailbox_its_domain_and_its_login_are_all_active(make_mailbox):
    rows = []
    for mailbox_on, domain_on, login_on in itertools.product((True, False), repeat=3):
        mailbox = make_mailbox(f"m{int(mailbox_on)}{int(domain_on)}{int(login_on)}@d{int(domain_on)}.test")
        Mailbox.objects.filter(pk=mailbox.pk).update(active=mailbox_on)
        Domain.objects.filter(pk=mailbox.domain_id).update(active=domain_on)
        get_user_model().objects.filter(pk=mailbox.user_id).update(is_active=login_on)
        loaded = Mailbox.objects.select_related("domain", "user").get(pk=mailbox.pk)
        queried = Mailbox.objects.usable().filter(pk=mailbox.pk).exists()
        rows.append((loaded.is_usable(), queried, current_user(mailbox.address) is not None))
    assert rows == [(True, True, True)] + [(False, False, False)] * 7


@pytest.mark.django_db(transaction=True)
def test_a_lease_taken_before_the_snapshot_failed_is_given_back(make_mailbox, monkeypatch):
    make_mailbox("half@example.test")

    def snapshot_fails(mailbox_id: int):
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(authenticator_module, "snapshot", snapshot_fails)
    authenticator = authenticator_on(
        BoundedExecutor(1, "test-db"), BoundedExecutor(1, "test-hash"), failure_delay=0, penalty_max=0
    )
    request = LoginRequest("half@example.test", PASSWORD, "USER", "192.0.2.10", True, uuid.uuid4().hex)
    assert asyncio.run(authenticator.authenticate(request)).failure is LoginFailure.TEMPORARY
    assert (authenticator.leases.owners(), MaildropLease.objects.count()) == ([], 0)


# --- Hashes that cannot be checked, answer times, penalised sources taking turns --------------


def fixed_clock_authenticator(**policy) -> Pop3Authenticator:
    authenticator = authenticator_on(
        BoundedExecutor(2, "test-db"), BoundedExecutor(1, "test-hash"), penalty_max=0, **policy
    )
    authenticator.clock = lambda: 100.0
    return authenticator


def attempt(authenticator: Pop3Authenticator, username: str, password: str = PASSWORD):
    request = LoginRequest(username, password, "USER", "192.0.2.10", True, uuid.uuid4().hex)
    return asyncio.run(authenticator.authenticate(request))


def store_hash(mailbox: Mailbox, encoded: str) -> None:
    get_user_model().objects.filter(pk=mailbox.user_id).update(password=encoded)


UNCHECKABLE_HASHES = {
    "bcrypt without its module": "bcrypt_sha256$$2b$12$abcdefghijklmnopqrstuuabcdefghijklmnopqrstuvwxyz01234",
    "pbkdf2, -1 iterations": "pbkdf2_sha256$-1$c2FsdA$aGFzaA==",
    "pbkdf2, 10^11 iterations": "pbkdf2_sha256$100000000000$c2FsdA$aGFzaA==",
    "pbkdf2, 11x the default": "pbkdf2_sha256$11000000$c2FsdA$aGFzaA==",
    "argon2, 20x the memory": "argon2$argon2id$v=19$m=2048000,t=2,p=8$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo",
}


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("encoded", UNCHECKABLE_HASHES.values(), ids=UNCHECKABLE_HASHES.keys())
def test_a_hash_that_cannot_be_checked_is_an_ordinary_failed_login_and_is_never_run(
    make_mailbox, monkeypatch, caplog, encoded
):
    monkeypatch.setitem(sys.modules, "bcrypt", None)  # import fails, as when it is not installed
    store_hash(make_mailbox("imported@example.test"), encoded)
    runs = []
    for hasher in ("PBKDF2PasswordHasher", "Argon2PasswordHasher"):
        real_verify = getattr(hashers, hasher).verify
        monkeypatch.setattr(
            getattr(hashers, hasher),
            "verify",
            lambda self, *args, real=real_verify: runs.append(self.algorithm) or real(self, *args),
        )
    delays = record_sleeps(monkeypatch)
    authenticator = fixed_clock_authenticator(failure_delay=2.0)
    with caplog.at_level(logging.WARNING, logger="mailadmin.pop3d.authenticator"):
        results = [attempt(authenticator, "imported@example.test") for _ in range(2)]
    assert [(r.failure, r.maildrop) for r in results] == [(LoginFailure.BAD_CREDENTIALS, None)] * 2
    assert (
        list(AuthFailure.objects.values_list("username", "reason"))
        == [("imported@example.test", "bad credentials")] * 2
    )
    assert [delay for delay in delays if delay] == [2.0, 2.0]  # no penalty; the failure delay
    assert runs == []
    assert len(caplog.messages) == 1  # once per account, however often it is tried
    assert caplog.messages[0].startswith(
        "the stored password hash of <imported@example.test> cannot be checked"
    )


@pytest.mark.django_db(transaction=True)
def test_a_hash_within_ten_times_the_default_cost_is_still_checked(make_mailbox):
    mailbox = make_mailbox("strong@example.test")
    store_hash(mailbox, make_password(PASSWORD, hasher=ScaledPBKDF2()))
    assert attempt(fixed_clock_authenticator(failure_delay=0), "strong@example.test").failure is None


class ScaledPBKDF2(hashers.PBKDF2PasswordHasher):
    iterations = hashers.PBKDF2PasswordHasher.iterations * 2


class FakeDatabase:
    """penalty_seconds answers from a table by source; row writes succeed and do nothing."""

    def __init__(self, penalties: dict[str, float]) -> None:
        self.penalties = penalties

    async def run(self, function, *args):
        if function is penalty_seconds:
            return self.penalties.get(args[0], 0.0)
        return None


class FakeHashing:
    """A password check that fails, costing a set time per user on a fake clock; counts overlaps."""

    def __init__(self, clock: list[float], costs: dict[str, float]) -> None:
        self.clock = clock
        self.costs = costs
        self.running = 0
        self.most_at_once = 0

    async def run(self, function, username, *args):
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        for _ in range(3):
            await REAL_SLEEP(0)  # others may start meanwhile
        self.clock[0] += self.costs.get(username, 0.0)
        self.running -= 1
        return None


REAL_SLEEP = asyncio.sleep


def fake_time_authenticator(monkeypatch, costs: dict[str, float], penalties: dict[str, float] | None = None):
    """An authenticator on a fake clock that only sleeps and password checks move."""
    clock = [1000.0]

    async def sleep(delay: float, result=None):
        clock[0] += delay
        return await REAL_SLEEP(0, result)

    monkeypatch.setattr(asyncio, "sleep", sleep)
    database = FakeDatabase(penalties or {})
    hashing = FakeHashing(clock, costs)
    leases = LeaseKeeper(database, node="test-node", ttl_seconds=60)
    authenticator = Pop3Authenticator(
        policy_with(failure_delay=2.0, cache_ttl_seconds=0), database=database, hashing=hashing, leases=leases
    )
    authenticator.clock = lambda: clock[0]
    return authenticator, hashing, clock


def test_a_failed_login_is_answered_at_the_same_time_whatever_hasher_the_account_uses(monkeypatch):
    costs = {"nobody@example.test": 0.10, "argon2@example.test": 0.12, "pbkdf2@example.test": 0.39}
    authenticator, _, clock = fake_time_authenticator(monkeypatch, costs)

    def answer_time(username: str) -> float:
        started = clock[0]
        request = LoginRequest(username, "wrong", "USER", "192.0.2.10", True, "s")
        assert asyncio.run(authenticator.authenticate(request)).failure is LoginFailure.BAD_CREDENTIALS
        return clock[0] - started

    assert [answer_time(name) for name in costs] == [2.0, 2.0, 2.0]
    costs["slow@example.test"] = 2.5
    assert answer_time("slow@example.test") == 2.5  # never earlier than the check ends
    # From then on every failure takes as long, so the costly account does not stand out.
    assert [answer_time(name) for name in costs] == [2.5, 2.5, 2.5, 2.5]


def test_a_penalised_source_has_one_password_check_at_a_time_and_others_are_not_queued(monkeypatch):
    authenticator, hashing, _ = fake_time_authenticator(monkeypatch, {}, penalties={"192.0.2.66": 4.0})

    def most_checks_at_once(peer: str, attempts: int) -> int:
        hashing.most_at_once = 0

        async def flood():
            requests = [
                LoginRequest(f"u{n}@example.test", "wrong", "USER", peer, True, "s") for n in range(attempts)
            ]
            await asyncio.gather(*(authenticator.authenticate(request) for request in requests))

        asyncio.run(flood())
        return hashing.most_at_once

    assert most_checks_at_once("192.0.2.66", 5) == 1
    assert most_checks_at_once("192.0.2.7", 2) == 2
    assert authenticator._turns == {}
