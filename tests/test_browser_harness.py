"""The browser harness gives back every database connection its test opened."""

import pytest
from django.contrib.auth import get_user_model
from django.db import DEFAULT_DB_ALIAS, connections

from tests.browser import headless_chromium


@pytest.mark.django_db(transaction=True)
def test_connections_opened_while_the_browser_is_open_are_closed_with_it(monkeypatch):
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    thread_connection = connections[DEFAULT_DB_ALIAS]
    with headless_chromium():
        assert get_user_model().objects.count() == 0
        opened = connections[DEFAULT_DB_ALIAS]
        assert opened is not thread_connection  # what pytest-django's teardown would not close
        assert opened.connection is not None
    assert opened.connection is None
