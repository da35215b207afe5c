"""Dovecot {SCHEME} hashes: checked by our hasher against hashes made by doveadm and mkpasswd,
bounded in cost like Django's, upgraded to argon2 by the first good login and never by a bad one."""

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import check_password, identify_hasher, make_password

from mailadmin.hosting import services, store
from mailadmin.hosting.actors import Actor
from mailadmin.hosting.authbackend import HashUpgradingBackend
from mailadmin.hosting.dovecothashes import DovecotPasswordHasher
from mailadmin.models import AuthFailure
from mailadmin.pop3d import registry
from pop3.mailbox import LoginFailure
from tests.dovecot_tools import (
    MKPASSWD_METHODS,
    MORE_SCHEMES,
    PASSWORD,
    REQUIRED_SCHEMES,
    WRONG_PASSWORD,
    doveadm_hash,
    mkpasswd_hash,
    needs_doveadm,
    needs_mkpasswd,
)
from tests.test_pop3_auth import (
    attempt,
    cached_authenticator,
    cached_login,
    fixed_clock_authenticator,
    record_sleeps,
)

ADDRESS = "moved@example.test"


def stored_hash(address: str = ADDRESS) -> str:
    return get_user_model().objects.get(username=address).password


def imported(make_mailbox, dovecot_hash: str, address: str = ADDRESS) -> None:
    make_mailbox(address)
    services.set_password_hash(Actor.cli(), address, dovecot_hash)


def stored_form(dovecot_hash: str) -> str:
    """What is stored for a Dovecot hash: crypt(3) hashes name their method, so lose their tag."""
    scheme, _, body = dovecot_hash[1:].partition("}")
    untagged = scheme.endswith("CRYPT") or scheme == "MD5"
    return "dovecot$" + (body if untagged else dovecot_hash)


# --- The hasher, against independent tools ---------------------------------------------------


@needs_doveadm
@pytest.mark.parametrize("scheme", REQUIRED_SCHEMES + MORE_SCHEMES)
def test_doveadm_hash_of_each_scheme_checks_the_right_password_only(scheme):
    dovecot_hash = doveadm_hash(scheme)
    stored = store.storable_password_hash(dovecot_hash)
    assert stored == stored_form(dovecot_hash)
    assert identify_hasher(stored).algorithm == "dovecot"
    assert identify_hasher(stored).must_update(stored) is True
    assert check_password(PASSWORD, stored) is True
    assert check_password(WRONG_PASSWORD, stored) is False


ENCODED_SCHEMES = {
    "SHA512-CRYPT.B64": "dovecot$$6$",
    "SHA256-CRYPT.HEX": "dovecot$$5$",
    "ARGON2ID.B64": "dovecot${ARGON2ID}$argon2id$",
    "SSHA.HEX": "dovecot${SSHA}",
    "SSHA512.B64": "dovecot${SSHA512}",
    "PLAIN-MD5.B64": "dovecot${PLAIN-MD5}",
}


@needs_doveadm
@pytest.mark.parametrize("scheme", ENCODED_SCHEMES)
def test_a_hash_in_another_encoding_is_stored_in_its_schemes_own(scheme):
    """doveadm pw -s SCHEME.HEX / .B64, as PostfixAdmin stores some hashes."""
    stored = store.storable_password_hash(doveadm_hash(scheme))
    assert stored.startswith(ENCODED_SCHEMES[scheme])
    assert (check_password(PASSWORD, stored), check_password(WRONG_PASSWORD, stored)) == (True, False)


@needs_doveadm
def test_plain_md5_in_base64_is_stored_as_the_hex_doveadm_writes_by_default():
    hex_form = store.storable_password_hash(doveadm_hash("PLAIN-MD5"))
    assert store.storable_password_hash(doveadm_hash("PLAIN-MD5.B64")) == hex_form


@needs_mkpasswd
@pytest.mark.parametrize("method", MKPASSWD_METHODS)
def test_mkpasswd_hash_of_each_crypt_method_checks_the_right_password_only(method):
    stored = store.storable_password_hash(mkpasswd_hash(method))
    assert (check_password(PASSWORD, stored), check_password(WRONG_PASSWORD, stored)) == (True, False)


@needs_mkpasswd
@pytest.mark.parametrize("method", ["sha512crypt", "md5crypt", "bcrypt"])
def test_crypt_scheme_reads_whichever_method_the_hash_names(method):
    """Dovecot's {CRYPT} is crypt(3): the hash's own $id$ says which method made it."""
    body = mkpasswd_hash(method).partition("}")[2]
    stored = store.storable_password_hash("{CRYPT}" + body)
    assert (check_password(PASSWORD, stored), check_password(WRONG_PASSWORD, stored)) == (True, False)


@needs_doveadm
def test_a_blf_crypt_password_longer_than_72_bytes_checks_as_dovecot_checked_it():
    """crypt_blowfish read 72 bytes of it; the bcrypt module refuses longer ones outright."""
    long_password = "a long passphrase, " * 5
    stored = store.storable_password_hash(doveadm_hash("BLF-CRYPT", long_password))
    assert check_password(long_password, stored) is True
    assert check_password(long_password[:72] + "anything else", stored) is True
    assert check_password(long_password[:71], stored) is False


@needs_doveadm
def test_the_summary_shows_the_scheme_and_hides_the_hash():
    stored = store.storable_password_hash(doveadm_hash("SHA512-CRYPT"))
    summary = DovecotPasswordHasher().safe_summary(stored)
    assert (summary["algorithm"], summary["scheme"]) == ("dovecot", "CRYPT")
    assert summary["hash"].startswith("$6$") and summary["hash"].endswith("*" * 10)
    assert stored.split("$")[-1] not in str(summary)


# --- What is refused, and why --------------------------------------------------------------


def refusal(password_hash: str) -> str:
    with pytest.raises(store.InvalidInput) as raised:
        store.storable_password_hash(password_hash)
    return str(raised.value)


@pytest.mark.parametrize(
    ("password_hash", "expected"),
    [
        ("{PLAIN}secret", "password hash: {PLAIN} is not a Dovecot scheme this server can check"),
        ("{SSHA}not base64!", "password hash: not a valid {SSHA} hash"),
        ("{PLAIN-MD5}abc", "password hash: not a valid {PLAIN-MD5} hash"),
        ("{SSHA.HEX}not hex", "password hash: not a valid {SSHA.HEX} hash (not hex)"),
        ("{SHA512-CRYPT.B64}JDYk!", "password hash: not a valid {SHA512-CRYPT.B64} hash (not b64)"),
        ("{SSHA.ROT13}abc", "password hash: {SSHA.ROT13} is not a Dovecot scheme this server can check"),
        (
            "{ARGON2ID}$argon2i$v=19$m=32768,t=4,p=1$c2FsdHNhbHQ$aGFzaGhhc2g",
            "password hash: not a valid {ARGON2ID}",
        ),
        ("{SHA512-CRYPT}", "password hash: not a valid {SHA512-CRYPT} hash"),
        ("{BLF-CRYPT}$2y$05$short", "password hash: not a valid {BLF-CRYPT} hash"),
    ],
)
def test_an_unknown_scheme_or_a_malformed_hash_is_refused_with_the_reason(password_hash, expected):
    assert refusal(password_hash).startswith(expected)


@pytest.mark.parametrize(
    ("password_hash", "expected"),
    [
        (
            "{SHA256-CRYPT}$5$rounds=2000000$nO4cmNyI/WvNJf.e$" + "E" * 43,
            "password hash has rounds 2000000: dovecot hashes here need 1 to 1000000",
        ),
        (
            "{BLF-CRYPT}$2y$16$ZH6yfQRK8DNO2w8i2j6yqOFOcL7/bQCDCS2U415cBFFEHrEiv2QIq",
            "password hash has work factor 16: dovecot hashes here need 4 to 15",
        ),
        (
            "{ARGON2ID}$argon2id$v=19$m=524288,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
            "password hash needs 524288 KiB to check: argon2 hashes here may need at most 204800 KiB",
        ),
    ],
)
def test_a_dovecot_hash_costing_more_than_the_import_allows_is_refused(password_hash, expected):
    assert refusal(password_hash).startswith(expected)


def test_a_dovecot_hash_whose_library_backend_is_missing_is_refused(monkeypatch):
    from passlib import hash as passlib_hash

    monkeypatch.setattr(passlib_hash.bcrypt, "has_backend", lambda name="any": False)
    assert refusal("{BLF-CRYPT}$2y$05$ZH6yfQRK8DNO2w8i2j6yqOFOcL7/bQCDCS2U415cBFFEHrEiv2QIq") == (
        "password hash: {BLF-CRYPT} hashes cannot be checked here: "
        "libpass finds no module for bcrypt installed"
    )


# --- Login: upgrade on success, never on failure --------------------------------------------


@needs_doveadm
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("scheme", REQUIRED_SCHEMES)
def test_first_good_login_replaces_the_dovecot_hash_with_argon2_and_the_next_uses_it(make_mailbox, scheme):
    imported(make_mailbox, doveadm_hash(scheme))
    authenticator, hashing = cached_authenticator(ttl=0)
    assert cached_login(authenticator, ADDRESS, PASSWORD) is None
    upgraded = stored_hash()
    assert identify_hasher(upgraded).algorithm == "argon2"
    assert check_password(PASSWORD, upgraded) is True
    assert cached_login(authenticator, ADDRESS, PASSWORD) is None
    assert stored_hash() == upgraded  # argon2 at today's parameters: nothing more to upgrade
    assert cached_login(authenticator, ADDRESS, WRONG_PASSWORD) is LoginFailure.BAD_CREDENTIALS
    assert hashing.calls == 3


@needs_doveadm
@pytest.mark.django_db(transaction=True)
def test_the_credential_cache_remembers_the_upgraded_hash_not_the_imported_one(make_mailbox):
    imported(make_mailbox, doveadm_hash("SSHA512"))
    authenticator, hashing = cached_authenticator()
    assert cached_login(authenticator, ADDRESS, PASSWORD) is None
    assert authenticator.cache.lookup(ADDRESS, PASSWORD) == registry.password_fingerprint(stored_hash())
    assert cached_login(authenticator, ADDRESS, PASSWORD) is None
    assert hashing.calls == 1  # the warm login matched the stored argon2 hash's fingerprint


@needs_doveadm
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("scheme", REQUIRED_SCHEMES)
def test_a_wrong_password_against_a_dovecot_hash_fails_at_the_fixed_time_and_changes_nothing(
    make_mailbox, monkeypatch, scheme
):
    dovecot_hash = doveadm_hash(scheme)
    imported(make_mailbox, dovecot_hash)
    delays = record_sleeps(monkeypatch)
    result = attempt(fixed_clock_authenticator(failure_delay=2.0), ADDRESS, WRONG_PASSWORD)
    assert (result.failure, result.maildrop) == (LoginFailure.BAD_CREDENTIALS, None)
    assert [delay for delay in delays if delay] == [2.0]  # as for any account: the hasher does not show
    assert stored_hash() == stored_form(dovecot_hash)
    assert list(AuthFailure.objects.values_list("username", "reason")) == [(ADDRESS, "bad credentials")]


@needs_doveadm
@pytest.mark.django_db(transaction=True)
def test_a_first_login_upgrading_a_legacy_hash_counts_as_a_check_for_the_failure_time(
    make_mailbox, monkeypatch
):
    """Failures are answered no sooner than the slowest check this process ran; a legacy login's
    check (its scheme, then argon2 for the upgrade) is one of them."""
    imported(make_mailbox, doveadm_hash("SHA256-CRYPT"))
    make_mailbox("argon2@example.test")
    clock = [100.0]
    authenticator = fixed_clock_authenticator(failure_delay=0.5)
    authenticator.clock = lambda: clock[0]
    real_run = authenticator.hashing.run

    async def run_on_the_fake_clock(function, username, *args):
        result = await real_run(function, username, *args)
        clock[0] += 3.0 if username == ADDRESS else 0.0
        return result

    monkeypatch.setattr(authenticator.hashing, "run", run_on_the_fake_clock)
    delays = record_sleeps(monkeypatch)
    assert attempt(authenticator, ADDRESS, PASSWORD).failure is None
    assert stored_hash().startswith("argon2$")
    assert (
        attempt(authenticator, "argon2@example.test", WRONG_PASSWORD).failure is LoginFailure.BAD_CREDENTIALS
    )
    assert [delay for delay in delays if delay] == [3.0]


# --- The upgrade never overwrites a password set meanwhile -----------------------------------


@needs_doveadm
@pytest.mark.django_db
def test_an_upgrade_racing_a_password_change_leaves_the_new_password(make_mailbox, monkeypatch):
    imported(make_mailbox, doveadm_hash("SHA512-CRYPT"))
    new_hash = make_password("a brand new password")

    def changed_meanwhile(raw_password, *args):
        # Another process sets a password while this login hashes the old one with argon2.
        get_user_model().objects.filter(username=ADDRESS).update(password=new_hash)
        return make_password(raw_password, *args)

    monkeypatch.setattr("mailadmin.hosting.authbackend.make_password", changed_meanwhile)
    user = HashUpgradingBackend().authenticate(None, username=ADDRESS, password=PASSWORD)
    assert user is not None and user.password.startswith("dovecot$")  # the hash it checked
    assert stored_hash() == new_hash


@needs_doveadm
@pytest.mark.django_db
def test_the_backend_upgrades_when_nothing_changed_and_refuses_unknown_and_inactive_logins(make_mailbox):
    imported(make_mailbox, doveadm_hash("SSHA256"))
    backend = HashUpgradingBackend()
    assert backend.authenticate(None, username=ADDRESS, password=WRONG_PASSWORD) is None
    assert stored_hash().startswith("dovecot${SSHA256}")
    user = backend.authenticate(None, username=ADDRESS, password=PASSWORD)
    assert user.password == stored_hash() and stored_hash().startswith("argon2$")
    assert backend.authenticate(None, username="nobody@example.test", password=PASSWORD) is None
    get_user_model().objects.filter(username=ADDRESS).update(is_active=False)
    assert backend.authenticate(None, username=ADDRESS, password=PASSWORD) is None
