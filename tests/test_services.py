"""The service layer: each function's rule, its scope for a domain administrator, its audit row."""

import hashlib
import importlib
import io
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from django.apps import apps as django_apps
from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import MD5PasswordHasher, PBKDF2PasswordHasher
from django.contrib.auth.models import Permission
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from mailadmin.hosting import audit, scopes, services, store
from mailadmin.hosting.actors import Actor, ActorKind
from mailadmin.mailin.delivery import deliver
from mailadmin.models import (
    AuditEntry,
    AuthFailure,
    Domain,
    DomainAdministrator,
    Mailbox,
    Message,
    Pop3Session,
)
from tests.conftest import open_session_row

pytestmark = pytest.mark.django_db

CLI = Actor.cli()
CHEAP_HASH = PBKDF2PasswordHasher().encode("hashed horse", "saltsaltsalt", iterations=1000)


@pytest.fixture
def domains():
    return services.create_domain(CLI, "ours.test"), services.create_domain(CLI, "theirs.test")


@pytest.fixture
def ours_admin(domains):
    """An actor administering ours.test only, as the admin builds it for the user."""
    services.save_domain_administrator(CLI, "olivia", ["ours.test"], "a long admin passphrase")
    user = get_user_model().objects.get(username="olivia")
    return Actor.for_user(user, "198.51.100.7")


def last_entry() -> AuditEntry:
    return AuditEntry.objects.order_by("-id").first()


def entry_fields(entry: AuditEntry) -> tuple:
    return (entry.actor_kind, entry.action, entry.object_type, entry.object_name, entry.domain_name)


# --- Actors and scopes -----------------------------------------------------------------------


def test_cli_actor_is_named_after_the_os_user_and_sees_every_domain(monkeypatch):
    monkeypatch.setattr("getpass.getuser", lambda: "operator")
    actor = Actor.cli()
    assert (actor.kind, actor.name, actor.user_id, actor.all_domains) == (
        ActorKind.CLI,
        "cli:operator",
        None,
        True,
    )


def test_user_actor_scope_superuser_administrator_and_plain_staff(ours_admin, domains):
    ours, _ = domains
    root = get_user_model().objects.create_superuser("root", "", "pw")
    staff = get_user_model().objects.create_user("staff", is_staff=True)
    assert Actor.for_user(root, "192.0.2.1").all_domains
    assert ours_admin.domain_ids == frozenset({ours.pk})
    assert ours_admin.client_address == "198.51.100.7"
    # Scope is granted by a domain tie, never assumed from the absence of one.
    assert Actor.for_user(staff).domain_ids == frozenset()


def test_token_actor_carries_its_name_and_the_scope_it_is_given(domains):
    ours, _ = domains
    token = Actor.token("provisioning", frozenset({ours.pk}), "203.0.113.5")
    assert (token.kind, token.name, token.user_id, token.client_address) == (
        ActorKind.TOKEN,
        "provisioning",
        None,
        "203.0.113.5",
    )
    assert list(scopes.visible_to(token, Domain).values_list("name", flat=True)) == ["ours.test"]
    services.update_domain(token, "ours.test", default_mailbox_quota_bytes=1)
    assert (last_entry().actor_kind, last_entry().actor_name) == ("token", "provisioning")


def test_visible_to_narrows_every_model_to_the_actors_domains(ours_admin, make_mailbox):
    ours_box, theirs_box = make_mailbox("a@ours.test"), make_mailbox("b@theirs.test")
    deliver([ours_box.address, theirs_box.address], [b"Subject: hi\n\nbody\n"])
    for mailbox in (ours_box, theirs_box):
        Pop3Session.objects.create(
            id=uuid.uuid4(),
            node="n:1",
            mailbox=mailbox,
            domain=mailbox.domain,
            peer_host="192.0.2.1",
            peer_port=1,
            local_host="h",
            local_port=2,
            started_at=timezone.now(),
        )
        AuthFailure.objects.create(
            created_at=timezone.now(),
            username=mailbox.address,
            domain=mailbox.domain,
            peer_host="x",
            source="x",
        )
    AuthFailure.objects.create(
        created_at=timezone.now(), username="x@elsewhere.test", peer_host="x", source="x"
    )
    assert list(scopes.visible_to(ours_admin, Domain).values_list("name", flat=True)) == ["ours.test"]
    assert [m.address for m in scopes.visible_to(ours_admin, Mailbox)] == ["a@ours.test"]
    assert [m.mailbox_id for m in scopes.visible_to(ours_admin, Message)] == [ours_box.pk]
    assert [s.mailbox_id for s in scopes.visible_to(ours_admin, Pop3Session)] == [ours_box.pk]
    assert [f.username for f in scopes.visible_to(ours_admin, AuthFailure)] == ["a@ours.test"]
    assert {e.domain_name for e in scopes.visible_to(ours_admin, AuditEntry)} == {"ours.test"}
    assert scopes.visible_to(CLI, AuthFailure).count() == 3


# --- Domains ---------------------------------------------------------------------------------


def test_create_domain_is_audited_with_its_settings(domains):
    entry = AuditEntry.objects.get(object_name="ours.test")
    assert entry_fields(entry) == ("cli", "create", "domain", "ours.test", "ours.test")
    assert entry.changes == {
        "quota_bytes": [None, 0],
        "max_mailboxes": [None, 0],
        "default_mailbox_quota_bytes": [None, 0],
    }
    assert entry.domain == domains[0]


def test_domain_administrators_may_not_create_or_delete_domains(ours_admin):
    with pytest.raises(services.NotPermitted, match="only an operator of every domain may create domains"):
        services.create_domain(ours_admin, "new.test")
    with pytest.raises(services.NotPermitted, match="only an operator of every domain may delete domains"):
        services.delete_domain(ours_admin, "ours.test")
    assert Domain.objects.count() == 2


def test_update_domain_writes_only_the_fields_given_and_records_before_and_after(domains):
    Domain.objects.filter(name="ours.test").update(used_bytes=777)  # as a delivery would
    domain = services.update_domain(CLI, "ours.test", quota_bytes=5000, max_mailboxes=0)
    assert (domain.quota_bytes, domain.used_bytes) == (5000, 777)
    entry = last_entry()
    assert entry_fields(entry) == ("cli", "update", "domain", "ours.test", "ours.test")
    assert entry.changes == {"quota_bytes": [0, 5000]}  # max_mailboxes was already 0


def test_update_domain_with_nothing_changed_writes_no_entry(domains):
    before = AuditEntry.objects.count()
    services.update_domain(CLI, "ours.test", quota_bytes=0)
    assert AuditEntry.objects.count() == before


def test_update_domain_refuses_bad_values(domains):
    with pytest.raises(store.InvalidInput, match="warning percentages must be between 1 and 100"):
        services.update_domain(CLI, "ours.test", quota_warning_percents="80,120")
    with pytest.raises(store.InvalidInput, match="not a setting that can be changed: used_bytes"):
        services.update_domain(CLI, "ours.test", used_bytes=0)


def test_domain_administrator_may_change_defaults_of_their_domain_only(ours_admin):
    services.update_domain(ours_admin, "ours.test", default_mailbox_quota_bytes=1024)
    entry = last_entry()
    assert (entry.actor_kind, entry.actor_name, entry.actor_user_id, entry.client_address) == (
        "user",
        "olivia",
        ours_admin.user_id,
        "198.51.100.7",
    )
    with pytest.raises(services.NotPermitted, match="may change max_mailboxes, quota_bytes"):
        services.update_domain(ours_admin, "ours.test", quota_bytes=1, max_mailboxes=1)
    with pytest.raises(services.NotPermitted, match="theirs.test is not a domain you administer"):
        services.update_domain(ours_admin, "theirs.test", default_mailbox_quota_bytes=1)
    # A domain that does not exist is refused alike: the refusal reveals nothing.
    with pytest.raises(services.NotPermitted, match="ghost.test is not a domain you administer"):
        services.update_domain(ours_admin, "ghost.test", default_mailbox_quota_bytes=1)


def test_suspend_and_activate_a_domain(domains, ours_admin):
    assert not services.set_domain_active(CLI, "ours.test", False).active
    assert last_entry().action == "suspend"
    assert services.set_domain_active(CLI, "ours.test", True).active
    assert (last_entry().action, last_entry().changes) == ("activate", {"active": [False, True]})
    with pytest.raises(services.NotPermitted, match="may change active"):
        services.set_domain_active(ours_admin, "ours.test", False)


def test_delete_domain_is_refused_while_it_has_mailboxes_and_its_entries_keep_its_name(make_mailbox, domains):
    services.create_mailbox(CLI, "a@ours.test", password="a good long password")
    with pytest.raises(store.InvalidInput, match="domain ours.test still has 1 mailbox; delete them first"):
        services.delete_domain(CLI, "ours.test")
    services.delete_mailbox(CLI, "a@ours.test")
    services.delete_domain(CLI, "ours.test")
    assert not Domain.objects.filter(name="ours.test").exists()
    entry = last_entry()
    assert entry_fields(entry) == ("cli", "delete", "domain", "ours.test", "ours.test")
    assert entry.domain is None
    assert [e.action for e in audit.entries(CLI, domain_name="ours.test")] == [
        "create",
        "create",
        "delete",
        "delete",
    ]


# --- Mailboxes -------------------------------------------------------------------------------


def test_create_mailbox_takes_the_domain_default_and_never_records_the_password(domains):
    services.update_domain(CLI, "ours.test", default_mailbox_quota_bytes=2048)
    created = services.create_mailbox(CLI, "A@ours.test", password="a good long password")
    assert created.mailbox.quota_bytes == 2048
    entry = last_entry()
    assert entry_fields(entry) == ("cli", "create", "mailbox", "a@ours.test", "ours.test")
    assert entry.changes == {
        "active": [None, True],
        "quota_bytes": [None, 2048],
        "quota_messages": [None, 0],
        "password": "changed",
    }
    assert "a good long password" not in str(AuditEntry.objects.values_list("changes", flat=True))


def test_create_mailbox_with_create_domain_records_both_and_needs_a_domain_manager(ours_admin):
    services.create_mailbox(CLI, "x@fresh.test", password="a good long password", create_domain=True)
    assert [(e.action, e.object_type, e.object_name) for e in AuditEntry.objects.order_by("-id")[:2]] == [
        ("create", "mailbox", "x@fresh.test"),
        ("create", "domain", "fresh.test"),
    ]
    with pytest.raises(services.NotPermitted, match="may create domains"):
        services.create_mailbox(
            ours_admin, "y@ours.test", password="a good long password", create_domain=True
        )


def test_domain_administrator_creates_mailboxes_in_their_domain_only(ours_admin):
    created = services.create_mailbox(ours_admin, "a@ours.test", password="a good long password")
    assert created.mailbox.domain.name == "ours.test"
    assert last_entry().actor_name == "olivia"
    with pytest.raises(services.NotPermitted, match="theirs.test is not a domain you administer"):
        services.create_mailbox(ours_admin, "a@theirs.test", password="a good long password")
    assert not Mailbox.objects.filter(domain__name="theirs.test").exists()


def test_a_refused_creation_writes_no_entry(domains, make_mailbox):
    make_mailbox("a@ours.test")
    before = AuditEntry.objects.count()
    with pytest.raises(store.AlreadyExists):
        services.create_mailbox(CLI, "a@ours.test", password="a good long password")
    assert AuditEntry.objects.count() == before


def test_update_mailbox_writes_only_the_settings_given_never_counters(domains, make_mailbox):
    mailbox = make_mailbox("a@ours.test")
    deliver([mailbox.address], [b"x" * 100])
    stale = Mailbox.objects.get(pk=mailbox.pk)
    deliver([mailbox.address], [b"y" * 100])
    updated = services.update_mailbox(CLI, "a@ours.test", quota_bytes=10_000, quota_messages=5)
    fresh = Mailbox.objects.get(pk=mailbox.pk)
    assert (fresh.quota_bytes, fresh.quota_messages) == (10_000, 5)
    assert (fresh.used_messages, fresh.next_uid) == (stale.used_messages + 1, stale.next_uid + 1)
    assert updated.quota_bytes == 10_000
    assert last_entry().changes == {"quota_bytes": [0, 10_000], "quota_messages": [0, 5]}


def test_update_mailbox_active_is_a_suspension_and_scope_applies(ours_admin, make_mailbox):
    make_mailbox("a@ours.test")
    make_mailbox("b@theirs.test")
    services.update_mailbox(ours_admin, "a@ours.test", active=False)
    assert (last_entry().action, last_entry().changes) == ("suspend", {"active": [True, False]})
    with pytest.raises(services.NotPermitted):
        services.update_mailbox(ours_admin, "b@theirs.test", active=False)
    assert Mailbox.objects.get(user__username="b@theirs.test").active


def test_set_password_and_hash_are_audited_without_their_values(ours_admin, make_mailbox):
    make_mailbox("a@ours.test")
    make_mailbox("b@theirs.test")
    services.set_password(ours_admin, "a@ours.test", "another good password")
    assert get_user_model().objects.get(username="a@ours.test").check_password("another good password")
    assert (last_entry().action, last_entry().changes) == ("set password", {"password": "changed"})
    services.set_password_hash(CLI, "a@ours.test", CHEAP_HASH)
    assert get_user_model().objects.get(username="a@ours.test").check_password("hashed horse")
    assert last_entry().changes == {"password": "changed"}
    with pytest.raises(store.InvalidInput, match="not in a format the configured hashers accept"):
        services.set_password_hash(CLI, "a@ours.test", "plain text")
    with pytest.raises(store.InvalidInput, match="^password hash has iterations 2000000000: "):
        services.set_password_hash(CLI, "a@ours.test", "pbkdf2_sha256$2000000000$salt$aGFzaA==")
    with pytest.raises(store.InvalidInput, match="control character U\\+0000"):
        services.set_password(CLI, "a@ours.test", "another\x00good password")
    assert get_user_model().objects.get(username="a@ours.test").check_password("hashed horse")
    with pytest.raises(services.NotPermitted):
        services.set_password(ours_admin, "b@theirs.test", "another good password")
    assert CHEAP_HASH not in str(AuditEntry.objects.values_list("changes", flat=True))


def test_delete_mailbox_records_what_went_and_respects_scope(ours_admin, make_mailbox):
    mailbox = make_mailbox("a@ours.test")
    make_mailbox("b@theirs.test")
    deliver([mailbox.address], [b"x" * 10])
    with pytest.raises(services.NotPermitted):
        services.delete_mailbox(ours_admin, "b@theirs.test")
    assert services.delete_mailbox(ours_admin, "a@ours.test") == 1
    assert entry_fields(last_entry()) == ("user", "delete", "mailbox", "a@ours.test", "ours.test")
    assert last_entry().changes == {"quota_bytes": [0, None], "messages": [1, None]}


def test_list_mailboxes_is_scoped(ours_admin, make_mailbox):
    make_mailbox("a@ours.test")
    make_mailbox("b@theirs.test")
    assert [m.address for m in services.list_mailboxes(ours_admin)] == ["a@ours.test"]
    assert [m.address for m in services.list_mailboxes(CLI)] == ["a@ours.test", "b@theirs.test"]
    with pytest.raises(services.NotPermitted):
        services.list_mailboxes(ours_admin, "theirs.test")


def test_import_mailboxes_is_all_or_nothing_audited_and_scoped(ours_admin):
    good = io.StringIO(f"address,password,password_hash,quota\na@ours.test,,{CHEAP_HASH},1M\n")
    assert [m.address for m in services.import_mailboxes(ours_admin, good)] == ["a@ours.test"]
    assert entry_fields(last_entry()) == ("user", "create", "mailbox", "a@ours.test", "ours.test")
    mixed = io.StringIO(
        f"address,password,password_hash,quota\nb@ours.test,,{CHEAP_HASH},\nc@theirs.test,,{CHEAP_HASH},\n"
    )
    with pytest.raises(services.NotPermitted, match="^line 3: not permitted: theirs.test is not a domain"):
        services.import_mailboxes(ours_admin, mixed)
    assert list(Mailbox.objects.values_list("user__username", flat=True)) == ["a@ours.test"]


def test_import_mailboxes_dry_run_writes_no_entry(domains):
    before = AuditEntry.objects.count()
    rows = io.StringIO(f"address,password,password_hash,quota\na@ours.test,,{CHEAP_HASH},\n")
    assert [m.address for m in services.import_mailboxes(CLI, rows, dry_run=True)] == ["a@ours.test"]
    assert (Mailbox.objects.count(), AuditEntry.objects.count()) == (0, before)


class RecordingHasher(MD5PasswordHasher):
    """Records, for each password hashed, whether a transaction was open meanwhile."""

    in_transaction: list[bool] = []

    def encode(self, password: str, salt: str) -> str:
        RecordingHasher.in_transaction.append(connection.in_atomic_block)
        return super().encode(password, salt)


@pytest.fixture
def recording_hasher(settings):
    settings.PASSWORD_HASHERS = [
        f"{__name__}.RecordingHasher",
        "django.contrib.auth.hashers.PBKDF2PasswordHasher",
    ]
    RecordingHasher.in_transaction = []
    return RecordingHasher


@contextmanager
def counting_commits_and_writes(monkeypatch) -> Iterator[tuple[list[int], list[bool]]]:
    """Count commits; for each write, record whether it ran inside a transaction."""
    commits: list[int] = []
    writes_in_transaction: list[bool] = []
    commit = connection.commit

    def counting_commit() -> None:
        commits.append(1)
        commit()

    def recording(execute, sql, params, many, context):
        if sql.lstrip().split(" ", 1)[0].upper() in {"INSERT", "UPDATE", "DELETE"}:
            writes_in_transaction.append(connection.in_atomic_block)
        return execute(sql, params, many, context)

    monkeypatch.setattr(connection, "commit", counting_commit)
    with connection.execute_wrapper(recording):
        yield commits, writes_in_transaction


IMPORT_WITH_PASSWORDS = (
    "address,password,password_hash,quota\n"
    "a@ours.test,first good password,,\n"
    f"b@ours.test,,{CHEAP_HASH},\n"
    "c@ours.test,third good password,,\n"
)


@pytest.mark.django_db(transaction=True)
def test_import_hashes_outside_any_transaction_then_writes_in_one(recording_hasher, monkeypatch):
    services.create_domain(CLI, "ours.test")
    with counting_commits_and_writes(monkeypatch) as (commits, writes_in_transaction):
        created = services.import_mailboxes(CLI, io.StringIO(IMPORT_WITH_PASSWORDS))
    assert [mailbox.address for mailbox in created] == ["a@ours.test", "b@ours.test", "c@ours.test"]
    assert recording_hasher.in_transaction == [False, False]
    assert len(commits) == 1
    assert writes_in_transaction and all(writes_in_transaction)
    assert get_user_model().objects.get(username="c@ours.test").check_password("third good password")


@pytest.mark.django_db(transaction=True)
def test_import_dry_run_hashes_outside_any_transaction_and_writes_nothing(recording_hasher, monkeypatch):
    services.create_domain(CLI, "ours.test")
    with counting_commits_and_writes(monkeypatch) as (commits, _):
        created = services.import_mailboxes(CLI, io.StringIO(IMPORT_WITH_PASSWORDS), dry_run=True)
    assert len(created) == 3
    assert recording_hasher.in_transaction == []  # it stores nothing, so it hashes nothing
    assert (commits, Mailbox.objects.count(), get_user_model().objects.count()) == ([], 0, 0)


def test_import_refuses_a_bad_hash_on_the_last_line_before_hashing_anything(domains, recording_hasher):
    rows = io.StringIO(IMPORT_WITH_PASSWORDS + "d@ours.test,,pbkdf2_sha256$0$salt$aGFzaA==,\n")
    with pytest.raises(store.InvalidInput, match="^line 5: password hash has iterations 0"):
        services.import_mailboxes(CLI, rows)
    assert recording_hasher.in_transaction == []


def test_import_refuses_a_missing_domain_or_a_bad_password_before_hashing_anything(domains, recording_hasher):
    rows = io.StringIO(IMPORT_WITH_PASSWORDS + "d@nowhere.test,fourth good password,,\n")
    with pytest.raises(store.DomainNotFound, match="^line 5: no such domain: nowhere.test$"):
        services.import_mailboxes(CLI, rows)
    rows = io.StringIO(IMPORT_WITH_PASSWORDS + "d@ours.test,password,,\n")
    with pytest.raises(store.InvalidInput, match="^line 5: password rejected: This password is too common.$"):
        services.import_mailboxes(CLI, rows)
    assert recording_hasher.in_transaction == []


@pytest.mark.django_db(transaction=True)
def test_every_service_setting_a_password_hashes_outside_its_transaction(recording_hasher):
    services.create_domain(CLI, "ours.test")
    services.create_mailbox(CLI, "a@ours.test", password="first good password")
    generated = services.create_mailbox(CLI, "b@ours.test").generated_password
    services.set_password(CLI, "a@ours.test", "second good password")
    services.save_domain_administrator(CLI, "olivia", ["ours.test"], "a long admin passphrase")
    assert recording_hasher.in_transaction == [False, False, False, False]
    assert get_user_model().objects.get(username="b@ours.test").check_password(generated)


def test_import_shows_its_rows_to_the_progress_wrapper(domains, recording_hasher):
    seen: list[int] = []

    def progress(rows):
        for row in rows:
            seen.append(row.line)
            yield row

    services.import_mailboxes(CLI, io.StringIO(IMPORT_WITH_PASSWORDS), progress=progress)
    assert seen == [2, 3, 4]


def test_recalculate_quota_corrects_drift_with_one_entry_per_object(ours_admin, make_mailbox):
    mailbox = make_mailbox("a@ours.test")
    other = make_mailbox("b@theirs.test")
    deliver([mailbox.address, other.address], [b"x" * 50])
    Mailbox.objects.update(used_bytes=1)
    drifts = services.recalculate_quota(ours_admin)
    assert {drift.subject for drift in drifts} == {"a@ours.test"}
    entry = AuditEntry.objects.get(action="recalculate quota")
    assert entry_fields(entry) == ("user", "recalculate quota", "mailbox", "a@ours.test", "ours.test")
    assert entry.changes == {"used_bytes": [1, drifts[0].actual]}
    assert Mailbox.objects.get(pk=other.pk).used_bytes == 1  # outside the administrator's scope
    with pytest.raises(services.NotPermitted):
        services.recalculate_quota(ours_admin, "b@theirs.test")


@pytest.mark.django_db(transaction=True)
def test_each_recounted_row_is_committed_with_its_audit_entry_before_the_next(make_mailbox, monkeypatch):
    """A full recount never holds every mailbox at once: each row's fix is visible to others
    (committed) by the time the next row's audit entry is written."""
    for address in ("a@ours.test", "b@ours.test"):
        deliver([make_mailbox(address).address], [b"x" * 50])
    Mailbox.objects.update(used_bytes=1)
    real_record = audit.record
    seen_from_elsewhere: dict[str, int] = {}

    def watched_record(actor, action, object_type, name, **fields):
        seen_from_elsewhere[name] = read_elsewhere(
            lambda: Mailbox.objects.get(user__username="a@ours.test").used_bytes
        )
        return real_record(actor, action, object_type, name, **fields)

    monkeypatch.setattr(audit, "record", watched_record)
    services.recalculate_quota(CLI)
    corrected = Mailbox.objects.get(user__username="a@ours.test").used_bytes
    assert corrected > 1
    # While a's entry is written, its fix is not committed yet; by b's, it is.
    assert seen_from_elsewhere == {"a@ours.test": 1, "b@ours.test": corrected}


def read_elsewhere(query):
    """Run ``query`` on another thread, hence on a connection of its own."""
    result = []

    def run():
        try:
            result.append(query())
        finally:
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return result[0]


def test_an_administrators_recount_counts_each_of_their_domains_once(ours_admin, make_mailbox):
    for address in ("a@ours.test", "b@ours.test", "c@theirs.test"):
        deliver([make_mailbox(address).address], [b"x" * 50])
    Domain.objects.update(used_bytes=1)
    with CaptureQueriesContext(connection) as queries:
        drifts = services.recalculate_quota(ours_admin)
    assert [(drift.subject, drift.counter) for drift in drifts] == [("ours.test", "used_bytes")]
    assert Domain.objects.get(name="theirs.test").used_bytes == 1
    domain_sums = [q["sql"] for q in queries.captured_queries if "SUM" in q["sql"] and "JOIN" in q["sql"]]
    assert len(domain_sums) == 1


# --- Sessions --------------------------------------------------------------------------------


def test_kick_marks_open_sessions_once_and_audits_each(make_mailbox):
    mailbox = make_mailbox("a@ours.test")
    first, second = open_session_row(mailbox), open_session_row(mailbox)
    open_session_row(mailbox, ended_at=timezone.now(), end_reason="quit")
    assert services.kick_sessions(CLI, address="a@ours.test") == 2
    assert services.kick_sessions(CLI, address="a@ours.test") == 0
    entries = AuditEntry.objects.filter(action="kick")
    assert sorted(e.object_name for e in entries) == sorted(f"a@ours.test {s.pk}" for s in (first, second))
    assert {e.domain_name for e in entries} == {"ours.test"}


def test_kick_by_session_id_is_scoped(ours_admin, make_mailbox):
    theirs = open_session_row(make_mailbox("b@theirs.test"))
    ours = open_session_row(make_mailbox("a@ours.test"))
    assert services.kick_sessions(ours_admin, session_ids=[theirs.pk, ours.pk]) == 1
    theirs.refresh_from_db()
    assert theirs.kick_requested_at is None
    with pytest.raises(services.NotPermitted):
        services.kick_sessions(ours_admin, address="b@theirs.test")


def test_a_forced_domain_delete_locks_every_mailbox_before_it_changes_the_domain(make_mailbox):
    """Mailbox rows before the domain's, as deliveries take them: no deadlock with one in flight."""
    if not connection.features.has_select_for_update:
        pytest.skip("row locks are PostgreSQL's: SQLite has one writer at a time")
    for address in ("b@gone.test", "a@gone.test"):
        make_mailbox(address)
    with CaptureQueriesContext(connection) as queries:
        services.delete_domain(CLI, "gone.test", force=True)
    sql = [query["sql"] for query in queries.captured_queries]
    first_domain_write = next(i for i, text in enumerate(sql) if text.startswith('UPDATE "mailadmin_domain"'))
    locks_of_the_domains_mailboxes = [
        i
        for i, text in enumerate(sql)
        if 'FOR UPDATE OF "mailadmin_mailbox"' in text and '"mailadmin_mailbox"."domain_id" =' in text
    ]
    assert len(locks_of_the_domains_mailboxes) == 1
    assert locks_of_the_domains_mailboxes[0] < first_domain_write
    assert not Domain.objects.filter(name="gone.test").exists()


def test_a_password_set_between_the_comparison_and_the_lock_is_replaced_by_the_one_given(
    domains, make_mailbox, monkeypatch
):
    """save_mailbox compares a password given with the login's hash before its transaction; if
    another writer sets a password in between, the one given is still set, as if after it."""
    make_mailbox("a@ours.test")
    compare = store.is_current_password

    def compare_then_change(mailbox, password):
        matches = compare(mailbox, password)
        services.set_password(CLI, "a@ours.test", "set meanwhile by another")
        return matches

    monkeypatch.setattr(store, "is_current_password", compare_then_change)
    services.save_mailbox(CLI, "a@ours.test", password="correct horse", quota_bytes=7)
    user = get_user_model().objects.get(username="a@ours.test")
    assert (user.check_password("correct horse"), Mailbox.objects.get().quota_bytes) == (True, 7)


def test_a_login_upgrading_the_hash_between_the_comparison_and_the_lock_is_no_password_change(
    domains, monkeypatch
):
    """The first login's upgrade to argon2 keeps the password: a PUT of that password stays a
    no-op, writes no hash and ends no session."""
    weak = PBKDF2PasswordHasher().encode("correct horse", "saltsalt", iterations=1000)
    store.create_mailbox("a@ours.test", password_hash=weak, create_domain=True)
    compare = store.is_current_password

    def compare_then_log_in(mailbox, password):
        matches = compare(mailbox, password)
        assert get_user_model().objects.get(username="a@ours.test").check_password(password)  # upgrades
        return matches

    monkeypatch.setattr(store, "is_current_password", compare_then_log_in)
    upgraded_before = AuditEntry.objects.filter(action="set password").count()
    services.save_mailbox(CLI, "a@ours.test", password="correct horse", quota_bytes=7)
    stored = get_user_model().objects.get(username="a@ours.test").password
    assert (stored.split("$")[0], Mailbox.objects.get().quota_bytes) == ("argon2", 7)
    assert AuditEntry.objects.filter(action="set password").count() == upgraded_before


def test_setting_a_password_locks_the_mailbox_before_its_login(make_mailbox):
    """Mailbox row, then login row, as deleting a mailbox takes them: no deadlock between the two."""
    if not connection.features.has_select_for_update:
        pytest.skip("row locks are PostgreSQL's: SQLite has one writer at a time")
    make_mailbox("a@ours.test")
    with CaptureQueriesContext(connection) as queries:
        services.set_password_hash(CLI, "a@ours.test", CHEAP_HASH)
    sql = [query["sql"] for query in queries.captured_queries]
    lock = next(i for i, text in enumerate(sql) if 'FOR UPDATE OF "mailadmin_mailbox", "auth_user"' in text)
    login_write = next(i for i, text in enumerate(sql) if text.startswith('UPDATE "auth_user"'))
    assert lock < login_write


def test_the_migration_takes_each_logins_hash_as_the_one_last_set(make_mailbox):
    migration = importlib.import_module("mailadmin.migrations.0016_mailbox_password_set_digest")
    for address in ("a@ours.test", "b@ours.test"):
        make_mailbox(address)
    Mailbox.objects.update(password_set_digest="")
    migration.fill_digests(django_apps, None)
    for mailbox in Mailbox.objects.select_related("user"):
        assert mailbox.password_set_digest == hashlib.sha256(mailbox.user.password.encode()).hexdigest()


def test_a_person_without_the_password_permission_cannot_test_a_password(domains, make_mailbox):
    """``save_mailbox`` leaves a mailbox's current password alone; the comparison that tells it
    so must not answer someone who may not set passwords (it would be a password oracle)."""
    viewer = get_user_model().objects.create_user("quota-only", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="change_mailbox"))
    DomainAdministrator.objects.create(user=viewer, domain=domains[0])
    make_mailbox("a@ours.test")
    for guess in ("correct horse", "wrong horse"):
        with pytest.raises(services.NotPermitted, match="password"):
            services.save_mailbox(Actor.for_user(viewer), "a@ours.test", password=guess, quota_bytes=1)
    assert Mailbox.objects.get().quota_bytes == 0


def test_a_person_needs_the_kick_permission_to_kick(domains, make_mailbox):
    """Viewing sessions is not enough: a view-only staff user within scope cannot kick."""
    viewer = get_user_model().objects.create_user("viewer", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_pop3session"))
    DomainAdministrator.objects.create(user=viewer, domain=domains[0])
    session = open_session_row(make_mailbox("a@ours.test"))
    with pytest.raises(services.NotPermitted, match="kicking POP3 sessions needs the kick permission"):
        services.kick_sessions(Actor.for_user(viewer), session_ids=[session.pk])
    session.refresh_from_db()
    assert session.kick_requested_at is None
    assert not AuditEntry.objects.filter(action="kick").exists()
    viewer.user_permissions.add(Permission.objects.get(codename="kick_pop3session"))
    viewer = get_user_model().objects.get(pk=viewer.pk)  # a fresh permission cache
    assert services.kick_sessions(Actor.for_user(viewer), session_ids=[session.pk]) == 1


def test_a_token_kicks_within_its_domains_only(make_mailbox):
    """The API lets only write tokens call this; the service bounds a token by its domains."""
    ours, theirs = (
        open_session_row(make_mailbox("a@ours.test")),
        open_session_row(make_mailbox("b@theirs.test")),
    )
    billing = Actor.token("billing", domain_ids=frozenset({ours.domain_id}))
    assert services.kick_sessions(billing, session_ids=[ours.pk, theirs.pk]) == 1
    ours.refresh_from_db(), theirs.refresh_from_db()
    assert (ours.kick_requested_at is not None, theirs.kick_requested_at) == (True, None)


# --- Domain administrators -------------------------------------------------------------------


def test_save_domain_administrator_creates_a_staff_login_with_the_group(ours_admin):
    user = get_user_model().objects.get(username="olivia")
    assert (user.is_staff, user.is_superuser) == (True, False)
    assert user.check_password("a long admin passphrase")
    assert user.has_perm("mailadmin.change_mailbox") and user.has_perm("mailadmin.view_auditentry")
    assert user.has_perm("mailadmin.kick_pop3session")
    assert not user.has_perm("mailadmin.add_domain") and not user.has_perm("auth.change_user")
    entry = AuditEntry.objects.get(object_type="administrator")
    assert (entry.action, entry.domain, entry.changes) == (
        "create",
        None,
        {"password": "changed", "domains": [None, ["ours.test"]]},
    )


def test_save_domain_administrator_replaces_the_domains_of_an_existing_one(ours_admin):
    result = services.save_domain_administrator(CLI, "olivia", ["theirs.test"], "a long admin passphrase")
    assert (result.created, result.domain_names) == (False, ["theirs.test"])
    assert list(DomainAdministrator.objects.values_list("domain__name", flat=True)) == ["theirs.test"]
    assert last_entry().changes["domains"] == [["ours.test"], ["theirs.test"]]


def test_save_domain_administrator_refuses_mailbox_logins_superusers_and_scoped_actors(
    ours_admin, make_mailbox
):
    make_mailbox("a@ours.test")
    get_user_model().objects.create_superuser("root", "", "pw")
    with pytest.raises(store.InvalidInput, match="a@ours.test is a mailbox's login"):
        services.save_domain_administrator(CLI, "a@ours.test", ["ours.test"], "a long admin passphrase")
    with pytest.raises(store.InvalidInput, match="root is a superuser"):
        services.save_domain_administrator(CLI, "root", ["ours.test"], "a long admin passphrase")
    with pytest.raises(services.NotPermitted, match="may make domain administrators"):
        services.save_domain_administrator(ours_admin, "eve", ["ours.test"], "a long admin passphrase")
    with pytest.raises(store.DomainNotFound):
        services.save_domain_administrator(CLI, "eve", ["ghost.test"], "a long admin passphrase")
    with pytest.raises(store.InvalidInput, match="password rejected"):
        services.save_domain_administrator(CLI, "eve", ["ours.test"], "password")
    assert not get_user_model().objects.filter(username="eve").exists()


def _import_file(addresses: list[str], quota: str = "") -> io.StringIO:
    lines = "".join(f"{address},,{CHEAP_HASH},{quota}\n" for address in addresses)
    return io.StringIO("address,password,password_hash,quota\n" + lines)


def test_import_statements_do_not_grow_with_the_rows(domains):
    counts = []
    for count, prefix in ((3, "few"), (60, "many")):
        addresses = [f"{prefix}{number}@ours.test" for number in range(count // 2)]
        addresses += [f"{prefix}{number}@theirs.test" for number in range(count - count // 2)]
        with CaptureQueriesContext(connection) as queries:
            created = services.import_mailboxes(CLI, _import_file(addresses))
        assert [mailbox.address for mailbox in created] == addresses
        counts.append(len(queries))
    assert counts[0] == counts[1] == 11  # the uid_validity values in one UPDATE
    entries = AuditEntry.objects.filter(action="create", object_type="mailbox")
    assert Mailbox.objects.count() == entries.count() == 63


def test_import_gives_each_mailbox_its_own_uid_validity_from_the_counter(domains):
    before = store.next_uid_validity()
    created = services.import_mailboxes(CLI, _import_file([f"u{number}@ours.test" for number in range(5)]))
    values = [mailbox.uid_validity for mailbox in Mailbox.objects.filter(pk__in=[m.pk for m in created])]
    assert sorted(values) == list(range(values[0], values[0] + 5)) and values[0] > before
    assert store.next_uid_validity() > values[-1]


def test_import_audit_entries_match_a_single_creation(domains):
    services.create_mailbox(CLI, "single@ours.test", password_hash=CHEAP_HASH, quota_bytes=1024**2)
    single = last_entry()
    services.import_mailboxes(CLI, _import_file(["bulk@ours.test"], "1M"))
    bulk = last_entry()
    assert (bulk.changes, bulk.actor_kind) == (single.changes, single.actor_kind)
    assert bulk.domain_name == "ours.test"
    assert bulk.changes == {
        "active": [None, True],
        "quota_bytes": [None, 1024**2],
        "quota_messages": [None, 0],
        "password": "changed",
    }


def test_import_refuses_the_first_row_past_the_domain_maximum(domains, make_mailbox):
    services.update_domain(CLI, "ours.test", max_mailboxes=3)
    make_mailbox("old@ours.test")
    rows = _import_file(["a@theirs.test", "a@ours.test", "b@ours.test", "c@ours.test", "d@ours.test"])
    with pytest.raises(store.LimitReached, match="^line 5: domain ours.test already has its maximum of 3"):
        services.import_mailboxes(CLI, rows)
    assert list(Mailbox.objects.values_list("user__username", flat=True)) == ["old@ours.test"]


def test_import_refuses_an_existing_mailbox_naming_the_earliest_wrong_row(domains, make_mailbox):
    make_mailbox("b@ours.test")
    make_mailbox("d@ours.test")
    rows = _import_file(["a@ours.test", "d@ours.test", "b@ours.test"])
    with pytest.raises(store.AlreadyExists, match="^line 3: mailbox d@ours.test already exists$"):
        services.import_mailboxes(CLI, rows)
    services.update_domain(CLI, "ours.test", max_mailboxes=5)
    rows = _import_file(["a@ours.test", "b@ours.test", "c@ours.test"])
    with pytest.raises(store.AlreadyExists, match="^line 3: mailbox b@ours.test already exists$"):
        services.import_mailboxes(CLI, rows)
    assert Mailbox.objects.count() == 2
