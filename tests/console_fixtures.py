"""Signed-in clients for the console's pages: a superuser, a domain administrator, plain staff."""

import pytest
from django.contrib.auth import get_user_model

from mailadmin.hosting import services
from mailadmin.hosting.actors import Actor


@pytest.fixture
def cheap_hashes(settings):
    """Passwords hashed in no time: these tests make many logins."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def domains(cheap_hashes):
    """ours.test and theirs.test, each with a 1 MiB cap."""
    cli = Actor.cli()
    return (
        services.create_domain(cli, "ours.test", quota_bytes=1024 * 1024),
        services.create_domain(cli, "theirs.test", quota_bytes=1024 * 1024),
    )


@pytest.fixture
def root_client(client, cheap_hashes):
    client.force_login(get_user_model().objects.create_superuser("root", "root@example.test", "pw"))
    return client


@pytest.fixture
def ours_client(client, domains):
    """An administrator of ours.test only."""
    services.save_domain_administrator(Actor.cli(), "olivia", ["ours.test"], "a long admin passphrase")
    client.force_login(get_user_model().objects.get(username="olivia"))
    return client


@pytest.fixture
def plain_staff_client(client, cheap_hashes):
    """Staff with no permissions at all."""
    client.force_login(get_user_model().objects.create_user("sam", password="pw", is_staff=True))
    return client
