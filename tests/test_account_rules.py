"""The store's account rules: which password hashes and passwords may enter, and uid_validity."""

import sys
import threading
import time
import types

import pytest
from django.contrib.auth import get_user_model
from django.db import connection, transaction

from mailadmin.hosting import store
from mailadmin.mailin.delivery import deliver
from mailadmin.models import UidValidityCounter

pytestmark = pytest.mark.django_db

SALT = "saltsaltsalt"
ARGON2_SALT_AND_HASH = "c2FsdHNhbHQ$aGFzaGhhc2hoYXNo"
BCRYPT_BODY = "N9qo8uLOickgx2ZMRZoMyeIjZAgcfl7p92ldGxad68LJZdL17lhWy"  # salt and checksum, 53 characters


def pbkdf2(iterations: int | str) -> str:
    return f"pbkdf2_sha256${iterations}${SALT}$aGFzaA=="


def argon2(time_cost: int = 2, memory_cost: int = 102400, parallelism: int = 8) -> str:
    return f"argon2$argon2id$v=19$m={memory_cost},t={time_cost},p={parallelism}${ARGON2_SALT_AND_HASH}"


def scrypt(work_factor: int, block_size: int = 8, parallelism: int = 5) -> str:
    return f"scrypt${work_factor}${SALT}${block_size}${parallelism}$aGFzaA=="


def refusal(password_hash: str) -> str:
    with pytest.raises(store.InvalidInput) as raised:
        store.check_password_hash(password_hash)
    return str(raised.value)


# --- Password hashes -------------------------------------------------------------------------


def test_a_hash_whose_hasher_library_is_missing_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "bcrypt", None)  # import fails, as when it is not installed
    assert refusal(f"bcrypt_sha256$$2b$12${BCRYPT_BODY}") == (
        "password hash is bcrypt_sha256, which cannot be checked here: the bcrypt module is not installed"
    )


@pytest.mark.parametrize("iterations", [-1, 0, 10_000_001, 2_000_000_000, 10**11])
def test_pbkdf2_iterations_outside_1_to_10_times_the_default_are_refused(iterations):
    assert refusal(pbkdf2(iterations)) == (
        f"password hash has iterations {iterations}: pbkdf2_sha256 hashes here need 1 to 10000000 "
        "(at most 10 times the current cost)"
    )


@pytest.mark.parametrize("iterations", [1, 1000, 10_000_000])
def test_pbkdf2_iterations_within_bounds_are_accepted(iterations):
    store.check_password_hash(pbkdf2(iterations))


@pytest.mark.parametrize(
    ("password_hash", "error"),
    [
        (argon2(time_cost=21), "time cost 21: argon2 hashes here need 1 to 20"),
        (argon2(time_cost=0), "time cost 0: argon2 hashes here need 1 to 20"),
        (argon2(parallelism=81), "parallelism 81: argon2 hashes here need 1 to 80"),
        (scrypt(2**14, block_size=81), "block size 81: scrypt hashes here need 1 to 80"),
        (scrypt(2**14, parallelism=0), "parallelism 0: scrypt hashes here need 1 to 50"),
    ],
)
def test_argon2_and_scrypt_costs_beyond_bounds_are_refused(password_hash, error):
    assert refusal(password_hash) == f"password hash has {error} (at most 10 times the current cost)"


def test_argon2_at_the_bounds_is_accepted():
    store.check_password_hash(argon2(time_cost=10, memory_cost=204_800, parallelism=80))
    store.check_password_hash(argon2(time_cost=20, memory_cost=102_400))


@pytest.mark.parametrize(
    ("password_hash", "error"),
    [
        (
            argon2(time_cost=20, memory_cost=1_024_000, parallelism=80),
            "costs 100 times the current cost to check: argon2 hashes here may cost at most 10 times",
        ),
        (
            argon2(time_cost=11, memory_cost=204_800),
            "costs 11 times the current cost to check: argon2 hashes here may cost at most 10 times",
        ),
        (
            argon2(time_cost=1, memory_cost=409_600),
            "needs 409600 KiB to check: argon2 hashes here may need at most 204800 KiB",
        ),
        (
            scrypt(2**14, block_size=16, parallelism=40),
            "costs 16 times the current cost to check: scrypt hashes here may cost at most 10 times",
        ),
    ],
)
def test_a_hash_whose_parameters_together_cost_too_much_is_refused(password_hash, error):
    assert refusal(password_hash) == f"password hash {error}"


def test_scrypt_that_openssl_could_not_check_is_refused():
    assert refusal(scrypt(3)) == "password hash has work factor 3: scrypt needs a power of 2"
    assert refusal(scrypt(2**15)) == (
        f"password hash needs {128 * 8 * (2**15 + 2 + 5)} bytes to check, more than scrypt's 33554432 here"
    )
    store.check_password_hash(scrypt(2**14))


@pytest.mark.parametrize(("rounds", "accepted"), [(3, False), (4, True), (15, True), (16, False)])
def test_bcrypt_rounds_may_exceed_the_default_by_three_doublings(monkeypatch, rounds, accepted):
    monkeypatch.setitem(sys.modules, "bcrypt", types.ModuleType("bcrypt"))
    password_hash = f"bcrypt_sha256$$2b${rounds:02d}${BCRYPT_BODY}"
    if accepted:
        store.check_password_hash(password_hash)
    else:
        assert refusal(password_hash) == (
            f"password hash has work factor {rounds}: bcrypt_sha256 hashes here need 4 to 15 "
            "(at most 10 times the current cost)"
        )


@pytest.mark.parametrize(
    ("password_hash", "error"),
    [
        ("plain text", "password hash is not in a format the configured hashers accept"),
        (pbkdf2("many"), "password hash is not a valid pbkdf2_sha256 hash"),
        ("argon2$argon2id$v=19$m=x$abc$def", "password hash is not a valid argon2 hash"),
        (pbkdf2(1000) + "A" * 100, "password hash is longer than 128 characters"),
    ],
)
def test_malformed_hashes_are_refused(password_hash, error):
    assert refusal(password_hash) == error


def test_every_way_a_hash_enters_is_checked(make_mailbox):
    make_mailbox("alice@example.test")
    with pytest.raises(store.InvalidInput, match="iterations 0"):
        store.set_password_hash("alice@example.test", pbkdf2(0))
    with pytest.raises(store.InvalidInput, match="iterations 0"):
        store.create_mailbox("bob@example.test", password_hash=pbkdf2(0))
    assert get_user_model().objects.get(username="alice@example.test").check_password("correct horse")
    assert not get_user_model().objects.filter(username="bob@example.test").exists()


# --- Passwords -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("control", "code"), [("\x00", "0000"), ("\r", "000D"), ("\n", "000A"), ("\x7f", "007F")]
)
def test_a_password_with_a_control_character_is_refused_wherever_it_is_set(make_mailbox, control, code):
    make_mailbox("alice@example.test")
    password = f"long enough{control}password"
    error = f"password rejected: it contains the control character U+{code}, which no POP3 client can send"
    with pytest.raises(store.InvalidInput) as raised:
        store.set_password("alice@example.test", password)
    assert str(raised.value) == error
    with pytest.raises(store.InvalidInput) as raised:
        store.create_mailbox("bob@example.test", password=password)
    assert str(raised.value) == error
    with pytest.raises(store.InvalidInput) as raised:
        store.hash_new_password(password, "carol@example.test")
    assert str(raised.value) == error
    assert get_user_model().objects.get(username="alice@example.test").check_password("correct horse")


def test_a_tab_can_be_sent_and_is_accepted(make_mailbox):
    make_mailbox("alice@example.test")
    store.set_password("alice@example.test", "long enough\tpassword")
    assert get_user_model().objects.get(username="alice@example.test").check_password("long enough\tpassword")


# --- uid_validity ----------------------------------------------------------------------------


def test_a_mailbox_recreated_within_the_same_second_gets_a_larger_uid_validity(make_mailbox, monkeypatch):
    monkeypatch.setattr(time, "time", lambda: 1_800_000_000.25)
    first = make_mailbox("alice@example.test")
    first_uidl = deliver([first.address], [b"Subject: one\r\n\r\nbody\r\n"])[0].uidl
    store.delete_mailbox(first.address)
    second = make_mailbox("alice@example.test")
    second_uidl = deliver([second.address], [b"Subject: one\r\n\r\nbody\r\n"])[0].uidl
    assert (first.uid_validity, second.uid_validity) == (1_800_000_000, 1_800_000_001)
    assert first_uidl != second_uidl
    assert UidValidityCounter.objects.get().last_given == 1_800_000_001


def test_uid_validity_follows_the_clock_when_it_is_ahead(make_mailbox, monkeypatch):
    monkeypatch.setattr(time, "time", lambda: 1_800_000_000.0)
    assert make_mailbox("a@example.test").uid_validity == 1_800_000_000
    monkeypatch.setattr(time, "time", lambda: 1_800_000_500.0)
    assert make_mailbox("b@example.test").uid_validity == 1_800_000_500
    monkeypatch.setattr(time, "time", lambda: 1_700_000_000.0)  # the clock stepped back
    assert make_mailbox("c@example.test").uid_validity == 1_800_000_501


def test_uid_validity_starts_after_every_mailbox_when_the_counter_row_is_gone(make_mailbox, monkeypatch):
    monkeypatch.setattr(time, "time", lambda: 1_800_000_000.0)
    make_mailbox("a@example.test")
    UidValidityCounter.objects.all().delete()
    assert make_mailbox("b@example.test").uid_validity == 1_800_000_001


@pytest.mark.django_db(transaction=True)
def test_concurrent_takers_never_get_the_same_uid_validity(monkeypatch):
    monkeypatch.setattr(time, "time", lambda: 1_800_000_000.0)
    taken: list[list[int]] = [[], []]
    errors: list[BaseException] = []

    def take(values: list[int]) -> None:
        try:
            for _ in range(20):
                with transaction.atomic():
                    values.append(store.next_uid_validity())
        except BaseException as error:  # noqa: BLE001 - reported by the test thread
            errors.append(error)
        finally:
            connection.close()

    threads = [threading.Thread(target=take, args=(values,)) for values in taken]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    assert all(values == sorted(values) for values in taken)
    assert sorted(taken[0] + taken[1]) == list(range(1_800_000_000, 1_800_000_040))
