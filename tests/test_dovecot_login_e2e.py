"""A Dovecot user's first POP3 login through a real runpop3, with poplib: the imported hash made
by doveadm lets them in, is replaced by argon2, and the next login checks the new hash."""

import poplib

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import check_password, identify_hasher

from mailadmin.hosting import services
from mailadmin.hosting.actors import Actor
from mailadmin.mailin.delivery import deliver
from mailadmin.models import AuthFailure, Mailbox
from tests.daemons import HOST
from tests.dovecot_tools import PASSWORD, REQUIRED_SCHEMES, WRONG_PASSWORD, doveadm_hash, needs_doveadm
from tests.pop3_server import running_pop3

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow, needs_doveadm]

MESSAGE = b"Subject: moved\r\n\r\nStill here after the move.\r\n"


def stored_hash(address: str) -> str:
    return get_user_model().objects.get(username=address).password


def pop3_login(port: int, address: str, password: str) -> tuple[int, int]:
    """Log in with poplib and return STAT, then QUIT; poplib.error_proto if refused."""
    client = poplib.POP3(HOST, port, timeout=10)
    try:
        client.user(address)
        assert client.pass_(password) == b"+OK Logged in."
        return client.stat()
    finally:
        client.quit()


def test_each_scheme_logs_in_upgrades_to_argon2_and_then_logs_in_with_argon2(tmp_path, make_mailbox):
    addresses = {scheme: f"{scheme.lower()}@moved.test" for scheme in REQUIRED_SCHEMES}
    for scheme, address in addresses.items():
        make_mailbox(address)
        services.set_password_hash(Actor.cli(), address, doveadm_hash(scheme))
        assert deliver([address], [MESSAGE])[0].delivered
    imported = {address: stored_hash(address) for address in addresses.values()}
    sizes = dict(Mailbox.objects.values_list("user__username", "used_bytes"))
    # No credential cache: the second login must check the stored hash, which is argon2 by then.
    with running_pop3(tmp_path / "pop3", POP3_AUTH_CACHE_TTL="0") as server:
        for scheme, address in addresses.items():
            with pytest.raises(poplib.error_proto) as refused:
                pop3_login(server.port, address, WRONG_PASSWORD)
            assert refused.value.args[0] == b"-ERR [AUTH] Authentication failed.", scheme
            assert stored_hash(address) == imported[address], scheme

            assert pop3_login(server.port, address, PASSWORD) == (1, sizes[address]), scheme
            upgraded = stored_hash(address)
            assert identify_hasher(upgraded).algorithm == "argon2", scheme
            assert check_password(PASSWORD, upgraded), scheme

            assert pop3_login(server.port, address, PASSWORD) == (1, sizes[address]), scheme
            assert stored_hash(address) == upgraded, scheme  # checked, and current: left alone
    failures = AuthFailure.objects.filter(reason="bad credentials")
    assert sorted(failures.values_list("username", flat=True)) == sorted(addresses.values())
