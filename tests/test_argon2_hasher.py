"""Argon2 checks in memory a hashing thread keeps: the same answers as argon2-cffi's own verify,
one buffer mapped per thread however many checks it runs, and nothing left in it between them."""

import asyncio
import threading
from collections.abc import Callable

import pytest
from argon2 import PasswordHasher
from argon2.low_level import Type, hash_secret
from django.contrib.auth import hashers

from mailadmin.executors import BoundedExecutor
from mailadmin.hosting import argon2hasher
from mailadmin.hosting.argon2hasher import KIB, Argon2PasswordHasher, KeptMemory, keep_memory_in_this_thread
from tests.dovecot_tools import PASSWORD, WRONG_PASSWORD, doveadm_hash, needs_doveadm

SALT = b"sixteen byte sal"
STOCK = hashers.Argon2PasswordHasher()  # Django's, verifying through argon2-cffi's argon2_verify
OURS = Argon2PasswordHasher()


def django_form(encoded: bytes) -> str:
    return "argon2" + encoded.decode("ascii")


def small_hash(
    *, time_cost=1, memory_cost=64, parallelism=1, hash_len=16, type=Type.ID, version=19, salt=SALT
) -> str:
    return django_form(
        hash_secret(PASSWORD.encode(), salt, time_cost, memory_cost, parallelism, hash_len, type, version)
    )


def in_keeping_thread(work: Callable[[KeptMemory], object], limit_bytes: int = argon2hasher.MAX_KEPT_BYTES):
    """Run ``work(kept)`` in a new thread that keeps its argon2 memory; return what it returned."""
    outcome = {}

    def run() -> None:
        kept = keep_memory_in_this_thread(limit_bytes)
        try:
            outcome["value"] = work(kept)
        except BaseException as error:  # re-raised in the test's thread
            outcome["error"] = error

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def answers(encoded: str, kept: KeptMemory) -> dict:
    return {
        "ours": [OURS.verify(password, encoded) for password in (PASSWORD, WRONG_PASSWORD)],
        "stock": [STOCK.verify(password, encoded) for password in (PASSWORD, WRONG_PASSWORD)],
        "decided_here": kept.decided,
    }


PARAMETERS = {
    "argon2id": {},
    "argon2i": {"type": Type.I},
    "argon2d": {"type": Type.D},
    "version 16": {"version": 16},
    "t=3, p=4": {"time_cost": 3, "parallelism": 4},
    "m=8 p=1 (the least)": {"memory_cost": 8},
    "m=257 (not a multiple of the lanes' segments)": {"memory_cost": 257, "parallelism": 2},
    "32-byte hash, 8-byte salt": {"hash_len": 32, "salt": b"8 bytes!"},
}


@pytest.mark.parametrize("parameters", PARAMETERS.values(), ids=PARAMETERS.keys())
def test_each_kind_of_argon2_hash_is_decided_in_kept_memory_as_argon2_cffi_decides_it(parameters):
    found = in_keeping_thread(lambda kept: answers(small_hash(**parameters), kept))
    assert found == {"ours": [True, False], "stock": [True, False], "decided_here": 2}


def test_django_default_hash_one_buffer_of_its_memory_cost_for_every_check():
    encoded = hashers.make_password(PASSWORD, hasher=OURS)
    assert encoded.startswith("argon2$argon2id$v=19$m=102400,t=2,p=8$")
    assert hashers.identify_hasher(encoded).__class__ is Argon2PasswordHasher

    def three_checks(kept: KeptMemory) -> tuple:
        results = [hashers.check_password(p, encoded) for p in (PASSWORD, WRONG_PASSWORD, PASSWORD)]
        return results, kept.maps, kept.decided, len(kept.buffer)

    assert in_keeping_thread(three_checks) == ([True, False, True], 1, 3, 102400 * KIB)


def test_argon2_cffi_default_hash_checks_the_same():
    encoded = django_form(PasswordHasher().hash(PASSWORD).encode())
    found = in_keeping_thread(lambda kept: answers(encoded, kept))
    assert found == {"ours": [True, False], "stock": [True, False], "decided_here": 2}


@needs_doveadm
def test_doveadm_argon2id_hash_checks_the_same():
    body = doveadm_hash("ARGON2ID").removeprefix("{ARGON2ID}")  # m=65536,t=3,p=1
    found = in_keeping_thread(lambda kept: answers("argon2" + body, kept))
    assert found == {"ours": [True, False], "stock": [True, False], "decided_here": 2}


def test_buffer_grows_to_the_largest_memory_cost_and_is_otherwise_reused():
    def checks(kept: KeptMemory) -> list:
        maps = []
        for memory_cost in (64, 64, 64, 64, 64, 256, 64, 128, 256):
            assert OURS.verify(PASSWORD, small_hash(memory_cost=memory_cost))
            maps.append((kept.maps, len(kept.buffer) // KIB))
        return maps

    assert in_keeping_thread(checks) == [(1, 64)] * 5 + [(2, 256)] * 4


def test_libargon2_wipes_the_buffer_after_each_check():
    def after_checks(kept: KeptMemory) -> list:
        found = []
        for password in (PASSWORD, WRONG_PASSWORD):
            OURS.verify(password, small_hash(memory_cost=512, parallelism=4))
            found.append(kept.buffer[:].count(0) == len(kept.buffer))
        return found

    assert in_keeping_thread(after_checks) == [True, True]


def test_whatever_the_buffer_holds_before_a_check_does_not_change_its_result():
    encoded = small_hash(memory_cost=512, time_cost=2, parallelism=4)

    def with_garbage(kept: KeptMemory) -> list:
        results = []
        for garbage in (b"\xaa", b"\xff", b"\x00"):
            OURS.verify(WRONG_PASSWORD, encoded)  # maps the buffer
            kept.buffer[:] = garbage * len(kept.buffer)
            results.append((OURS.verify(PASSWORD, encoded), OURS.verify(WRONG_PASSWORD, encoded)))
        return results

    assert in_keeping_thread(with_garbage) == [(True, False)] * 3


def test_a_check_needing_more_than_the_limit_is_left_to_argon2_cffi():
    encoded = small_hash(memory_cost=256)
    found = in_keeping_thread(lambda kept: (answers(encoded, kept), kept.maps), limit_bytes=128 * KIB)
    assert found == ({"ours": [True, False], "stock": [True, False], "decided_here": 0}, 0)


UNUSUAL_ENCODINGS = {
    "no version (0x10)": lambda e: e.replace("$v=19", ""),
    "a leading zero": lambda e: e.replace("m=64,", "m=064,"),
    "salt's last character not canonical": lambda e: e.replace("bA$", "bB$"),
    "a salt too short": lambda e: e.replace("c2l4dGVlbiBieXRlIHNhbA", "c2hvcnQ"),
    "a number beyond 32 bits": lambda e: e.replace("t=1,", "t=4294967297,"),
    "not argon2": lambda e: e.replace("argon2id", "argon2xx"),
}


def outcome(verify: Callable[[str], bool]) -> list:
    """What each password gets: True, False, or the exception's type."""
    found = []
    for password in (PASSWORD, WRONG_PASSWORD):
        try:
            found.append(verify(password))
        except ValueError as error:
            found.append(type(error))
    return found


@pytest.mark.parametrize("change", UNUSUAL_ENCODINGS.values(), ids=UNUSUAL_ENCODINGS.keys())
def test_unusual_encodings_are_left_to_argon2_cffi(change):
    encoded = change(small_hash())
    assert encoded != small_hash()

    def both(kept: KeptMemory) -> tuple:
        ours = outcome(lambda password: OURS.verify(password, encoded))
        return ours, outcome(lambda password: STOCK.verify(password, encoded)), kept.decided

    ours, stock, decided = in_keeping_thread(both)
    assert ours == stock
    assert ours[1] is not True
    assert decided == 0


def test_threads_that_keep_no_memory_check_as_django_does():
    encoded = small_hash()
    assert argon2hasher.kept_memory() is None
    assert [OURS.verify(p, encoded) for p in (PASSWORD, WRONG_PASSWORD)] == [True, False]
    assert argon2hasher.kept_memory() is None


def test_hashing_executor_threads_keep_their_memory():
    encoded = small_hash()
    hashing = BoundedExecutor(1, "test-auth", initializer=keep_memory_in_this_thread)

    def check() -> tuple[bool, int, int]:
        kept = argon2hasher.kept_memory()
        return OURS.verify(PASSWORD, encoded), kept.maps, kept.decided

    async def three() -> list:
        return [await hashing.run(check) for _ in range(3)]

    try:
        assert asyncio.run(three()) == [(True, 1, 1), (True, 1, 2), (True, 1, 3)]
    finally:
        hashing.shutdown()
