"""A unit of database work pays no health-check round trip on a connection whose socket is quiet,
and still reconnects when the server has ended its connection."""

import asyncio

import pytest
from django.db import DEFAULT_DB_ALIAS, connection, connections

from mailadmin.executors import BoundedExecutor
from tests.test_pop3_live import daemon_connections, needs_postgresql, terminate_other_backends

__all__ = ["daemon_connections"]  # the fixture, used by name


@pytest.fixture
def health_checks(monkeypatch) -> list[bool]:
    """What each of Django's health checks (``SELECT 1``) answered, in any thread."""
    answers: list[bool] = []
    real = type(connections[DEFAULT_DB_ALIAS]).is_usable

    def is_usable(self) -> bool:
        answers.append(real(self))
        return answers[-1]

    monkeypatch.setattr(type(connections[DEFAULT_DB_ALIAS]), "is_usable", is_usable)
    return answers


def backend_pid() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return cursor.fetchone()[0]


def run(executor: BoundedExecutor, function):
    return asyncio.run(executor.run(function))


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("daemon_connections")
def test_units_on_a_connection_in_good_standing_send_no_health_check(health_checks):
    needs_postgresql()
    executor = BoundedExecutor(1, "test-db")
    pids = [run(executor, backend_pid) for _ in range(3)]
    assert pids[0] == pids[1] == pids[2]  # the thread kept its connection
    assert health_checks == []


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("daemon_connections")
def test_a_unit_after_the_server_ended_the_connection_checks_it_and_reconnects(health_checks):
    needs_postgresql()
    executor = BoundedExecutor(1, "test-db")
    before = run(executor, backend_pid)
    terminate_other_backends()
    after = run(executor, backend_pid)
    assert after != before
    assert health_checks == [False]  # the server's farewell was waiting on the socket
