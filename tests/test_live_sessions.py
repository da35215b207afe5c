"""The live sessions page: its rows, the doorbell that keeps them fresh, its websocket and its kick."""

import asyncio
import logging
import uuid
from datetime import timedelta

import pytest
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.db import connection
from django.db.models.functions import Now
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from mailadmin.asgi import application
from mailadmin.console import consumers, sessions
from mailadmin.console.consumers import LiveSessionsConsumer, differences
from mailadmin.console.poller import ChangeReader, SessionPoller
from mailadmin.console.routing import LIVE_SESSIONS_SOCKET_PATH
from mailadmin.executors import BoundedExecutor
from mailadmin.hosting import services
from mailadmin.hosting.actors import Actor
from mailadmin.models import AuditEntry, DomainAdministrator, Pop3Node, Pop3Session
from mailadmin.pop3d import feed
from mailadmin.pop3d.leases import LeaseKeeper
from mailadmin.pop3d.registry import Pop3Monitor
from pop3.mailbox import ConnectionInfo
from tests.conftest import open_session_row

NODE = "n:1"  # open_session_row's process
ORIGIN = b"http://127.0.0.1:8000"
RECEIVE_TIMEOUT = 30.0
PAGE_URL = "/admin/sessions/live/"
KICK_URL = "/admin/sessions/live/kick/"


@pytest.fixture
def fast_hashing(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def live_node(db, settings):
    """The process of open_session_row's rows, heartbeating; taken for dead only after hours
    (ten monitor intervals), however slowly a loaded machine runs the test."""
    settings.POP3_MONITOR_INTERVAL = 3600.0
    now = timezone.now()
    return Pop3Node.objects.create(name=NODE, started_at=now, heartbeat_at=now)


def end(session: Pop3Session) -> None:
    Pop3Session.objects.filter(pk=session.pk).update(
        ended_at=timezone.now(), end_reason="quit", updated_at=Now()
    )


def user(username: str, *, staff: bool = True, superuser: bool = False, permissions: tuple[str, ...] = ()):
    account = get_user_model().objects.create_user(
        username, password="pw", is_staff=staff, is_superuser=superuser
    )
    account.user_permissions.add(*Permission.objects.filter(codename__in=permissions))
    return account


def cookie_of(account) -> str:
    client = Client()
    client.force_login(account)
    return client.cookies["sessionid"].value


def communicator(cookie: str | None = None, origin: bytes = ORIGIN) -> WebsocketCommunicator:
    headers = [(b"origin", origin), (b"host", b"127.0.0.1:8000")]
    if cookie is not None:
        headers.append((b"cookie", f"sessionid={cookie}".encode()))
    return WebsocketCommunicator(application, LIVE_SESSIONS_SOCKET_PATH, headers=headers)


async def receive(socket: WebsocketCommunicator) -> dict:
    return await socket.receive_json_from(timeout=RECEIVE_TIMEOUT)


def ids(rows: list[dict]) -> list[str]:
    return [row["id"] for row in rows]


# --- Rows, paging and search ----------------------------------------------------------------


@pytest.mark.django_db
def test_a_page_holds_at_most_page_size_rows_newest_first(make_mailbox, live_node):
    mailbox = make_mailbox("alice@example.test")
    start = timezone.now()
    made = [
        open_session_row(mailbox, started_at=start - timedelta(seconds=n))
        for n in range(sessions.PAGE_SIZE + 20)
    ]

    first = sessions.read_page(Actor.cli(), sessions.View())
    second = sessions.read_page(Actor.cli(), sessions.View(page=2))
    beyond = sessions.read_page(Actor.cli(), sessions.View(page=9))

    assert (first.total, first.pages, len(first.rows)) == (120, 2, 100)
    assert ids(first.rows) == [str(session.pk) for session in made[:100]]
    assert ids(second.rows) == [str(session.pk) for session in made[100:]]
    assert (beyond.number, ids(beyond.rows)) == (2, ids(second.rows))


@pytest.mark.django_db
def test_a_page_and_its_total_come_from_one_statement(make_mailbox, live_node):
    """A count apart from the rows could disagree with them while sessions come and go."""
    mailbox = make_mailbox("alice@example.test")
    open_session_row(mailbox)
    open_session_row(mailbox)

    with CaptureQueriesContext(connection) as queries:
        page = sessions.read_page(Actor.cli(), sessions.View())

    assert (len(queries.captured_queries), page.total, len(page.rows)) == (1, 2, 2)


@pytest.mark.django_db
def test_the_search_matches_the_address_or_the_client_address(make_mailbox, live_node):
    alice, bob = make_mailbox("alice@example.test"), make_mailbox("bob@example.test")
    from_alice = open_session_row(alice, peer_host="198.51.100.7")
    from_bob = open_session_row(bob, peer_host="203.0.113.9")

    by_address = sessions.read_page(Actor.cli(), sessions.View(search="ALICE@"))
    by_client = sessions.read_page(Actor.cli(), sessions.View(search="203.0.113"))

    assert ids(by_address.rows) == [str(from_alice.pk)]
    assert ids(by_client.rows) == [str(from_bob.pk)]
    assert sessions.View(search="alice").matches("Alice@example.test", "192.0.2.1")
    assert not sessions.View(search="alice").matches("bob@example.test", "192.0.2.1")


@pytest.mark.django_db
def test_a_row_shows_the_listed_columns(make_mailbox, live_node):
    mailbox = make_mailbox("alice@example.test")
    session = open_session_row(
        mailbox,
        tls_version="TLSv1.3",
        authenticated_at=timezone.now(),
        commands=7,
        retr_count=2,
        retr_bytes=3072,
        marked_count=1,
        marked_bytes=1024,
    )

    [row] = sessions.read_page(Actor.cli(), sessions.View()).rows

    assert row == {
        "id": str(session.pk),
        "address": "alice@example.test",
        "client": "192.0.2.1",
        "client_port": 1,
        "tls": "TLSv1.3",
        "process": NODE,
        "state": "transaction",
        "since": session.started_at.isoformat(),
        "commands": 7,
        "retrieved": 2,
        "retrieved_size": "3.0 KiB",
        "marked": 1,
        "marked_size": "1.0 KiB",
    }


@pytest.mark.django_db
def test_sessions_leave_when_ended_or_when_their_process_stops_heartbeating(
    make_mailbox, live_node, settings
):
    mailbox = make_mailbox("alice@example.test")
    ended = open_session_row(mailbox, ended_at=timezone.now())
    open_session_row(mailbox, node="gone:2")  # a process that never registered
    alive = open_session_row(mailbox)
    assert ids(sessions.read_page(Actor.cli(), sessions.View()).rows) == [str(alive.pk)]
    assert str(ended.pk) not in ids(sessions.read_page(Actor.cli(), sessions.View()).rows)

    settings.POP3_MONITOR_INTERVAL = 1.0  # taken for dead after 10 s without a heartbeat
    Pop3Node.objects.filter(name=NODE).update(heartbeat_at=timezone.now() - timedelta(seconds=11))

    assert sessions.read_page(Actor.cli(), sessions.View()).rows == []


def test_a_view_from_the_page_is_clamped_to_sane_values():
    assert sessions.View.from_request("  bob  ", "3") == sessions.View("bob", 3)
    assert sessions.View.from_request(None, "-4") == sessions.View("", 1)
    assert sessions.View.from_request(["x"], "many") == sessions.View("", 1)
    assert sessions.View.from_request("x" * 1000, 10**9) == sessions.View("x" * 320, 100_000)


def test_differences_name_new_changed_and_gone_rows_and_the_order():
    a, b, c = ({"id": name, "commands": 0} for name in "abc")
    before = sessions.Page([a, b], total=2)
    after = sessions.Page([c, {**a, "commands": 3}], total=2)

    assert differences(before, after) == {
        "upsert": [c, {**a, "commands": 3}],
        "remove": ["b"],
        "order": ["c", "a"],
    }
    assert differences(after, after) is None


def test_a_page_is_updated_a_second_apart_from_start_to_start(monkeypatch):
    """An update that took 0.3 s is followed 0.7 s later, one that took 1.4 s at once: the
    page keeps the ticks' beat instead of drifting a read's length off it each time."""
    clock = {"now": 100.0}
    reads = iter([0.3, 1.4])
    pauses = []

    async def send_changes():
        clock["now"] += next(reads)

    async def pause(seconds):
        pauses.append(round(seconds, 6))
        clock["now"] += seconds
        consumer.changed.set()
        if len(pauses) == 2:
            raise asyncio.CancelledError

    async def follow():
        asyncio.get_running_loop().time = lambda: clock["now"]
        consumer.changed = asyncio.Event()
        consumer.changed.set()
        with pytest.raises(asyncio.CancelledError):
            await consumer.follow()

    consumer = LiveSessionsConsumer.__new__(LiveSessionsConsumer)
    consumer.send_changes = send_changes
    monkeypatch.setattr(consumers.asyncio, "sleep", pause)
    asyncio.run(follow())
    assert pauses == [0.7, 0.0]


# --- The embedded doorbell ------------------------------------------------------------------


@pytest.mark.django_db
def test_the_change_reader_tells_each_change_once(make_mailbox):
    mailbox = make_mailbox("alice@example.test")
    reader = ChangeReader()
    assert reader.read() is None  # nothing yet

    session = open_session_row(mailbox)
    first = reader.read()
    again = reader.read()
    Pop3Session.objects.filter(pk=session.pk).update(
        commands=5, updated_at=timezone.now() + timedelta(seconds=1)
    )
    after_update = reader.read()

    expected = [
        {
            "id": str(session.pk),
            "domain": mailbox.domain_id,
            "username": mailbox.address,
            "peer_host": "192.0.2.1",
        }
    ]
    assert first == {"type": "sessions.changed", "rows": expected}
    assert again is None
    assert after_update == {"type": "sessions.changed", "rows": expected}


@pytest.mark.django_db
def test_the_change_reader_names_no_rows_when_too_many_changed(make_mailbox):
    mailbox = make_mailbox("alice@example.test")
    reader = ChangeReader()
    reader.read()
    for _ in range(feed.MAX_NOTICE_ROWS + 1):
        open_session_row(mailbox)

    assert reader.read() == {"type": "sessions.changed", "rows": None}
    assert reader.read() is None


def poller_tasks() -> int:
    return sum(task.get_coro().__qualname__ == "SessionPoller._run" for task in asyncio.all_tasks())


@pytest.mark.django_db(transaction=True)
def test_one_poller_runs_from_the_first_page_to_the_last():
    poller = SessionPoller()

    async def scenario() -> list[tuple[bool, int]]:
        seen = []
        for step in (poller.subscribe, poller.subscribe, poller.unsubscribe, poller.unsubscribe):
            step()
            await asyncio.sleep(0.01)  # a cancelled task ends at the loop's next turn
            seen.append((poller.running, poller_tasks()))
        return seen

    assert asyncio.run(scenario()) == [(True, 1), (True, 1), (True, 1), (False, 0)]


def test_no_poller_runs_when_runpop3_publishes_through_redis(settings):
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels_redis.core.RedisChannelLayer"}}
    poller = SessionPoller()

    async def scenario() -> tuple[bool, int]:
        poller.subscribe()
        return poller.running, poller_tasks()

    assert asyncio.run(scenario()) == (False, 0)


# --- runpop3's doorbell (with a channel layer that crosses processes) ------------------------


class RecordingLayer:
    def __init__(self, *, hang: bool = False, fail: bool = False) -> None:
        self.sent: list[tuple[str, dict]] = []
        self.hang, self.fail = hang, fail
        self.gate: asyncio.Event | None = None

    async def group_send(self, group: str, message: dict) -> None:
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise ConnectionError("redis is down")
        if self.hang:
            await asyncio.Event().wait()
        self.sent.append((group, message))


class FakeSession:
    def kick(self, reason) -> bool:
        return True


@pytest.mark.django_db(transaction=True)
def test_runpop3_publishes_a_notice_about_the_rows_each_tick_wrote(make_mailbox):
    layer = RecordingLayer()
    executor = BoundedExecutor(1, "test-db")
    leases = LeaseKeeper(executor, node="testhost:1", ttl_seconds=60)

    async def scenario() -> None:
        monitor = Pop3Monitor(
            executor,
            leases,
            node="testhost:1",
            interval=1.0,
            on_give_up=lambda: None,
            publisher=feed.SessionPublisher(layer),
        )
        recorder = monitor.recorder(FakeSession())
        recorder.opened(ConnectionInfo(("192.0.2.7", 40000), ("192.0.2.1", 110), False, uuid.uuid4().hex))
        await monitor.tick()
        await monitor.tick()  # nothing written: no notice
        await monitor.publisher.settle()

    asyncio.run(scenario())

    [session] = Pop3Session.objects.all()
    assert layer.sent == [
        (
            "pop3-sessions",
            {
                "type": "sessions.changed",
                "rows": [{"id": str(session.pk), "domain": None, "username": "", "peer_host": "192.0.2.7"}],
            },
        )
    ]


def test_a_publish_that_hangs_or_fails_is_given_up_and_logged_once(caplog):
    async def scenario(layer: RecordingLayer) -> None:
        publisher = feed.SessionPublisher(layer)
        publisher.send(feed.notice(None))
        await publisher.settle()
        publisher.send(feed.notice(None))
        await publisher.settle()

    with caplog.at_level(logging.WARNING, logger="mailadmin.pop3"):
        asyncio.run(scenario(RecordingLayer(hang=True)))
        asyncio.run(scenario(RecordingLayer(fail=True)))

    assert [record.message.split(" (")[0] for record in caplog.records] == [
        "live session notices are not getting through",
        "live session notices are not getting through",
    ]


def test_notices_waiting_behind_a_publish_are_merged_into_one():
    layer = RecordingLayer()

    async def scenario() -> None:
        layer.gate = asyncio.Event()
        publisher = feed.SessionPublisher(layer)
        row = {"id": "a", "domain": None, "username": "", "peer_host": "x"}
        publisher.send(feed.notice([row]))
        await asyncio.sleep(0)  # the first publish is under way, held at the gate
        publisher.send(feed.notice([{**row, "id": "b"}]))
        publisher.send(feed.notice([{**row, "id": "c"}]))
        layer.gate.set()
        await publisher.settle()

    asyncio.run(scenario())

    assert [[row["id"] for row in message["rows"]] for _, message in layer.sent] == [["a"], ["b", "c"]]


# --- The websocket ----------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_staff_get_a_snapshot_then_the_changes(make_mailbox, live_node, fast_hashing):
    mailbox = make_mailbox("alice@example.test")
    first = open_session_row(mailbox, started_at=timezone.now() - timedelta(minutes=1))
    cookie = cookie_of(user("root", superuser=True))

    async def scenario() -> list[dict]:
        socket = communicator(cookie)
        connected, _ = await socket.connect(timeout=RECEIVE_TIMEOUT)
        assert connected
        snapshot = await receive(socket)
        second = await database_sync_to_async(open_session_row)(mailbox, peer_host="198.51.100.9")
        added = await receive(socket)
        await database_sync_to_async(end)(first)
        removed = await receive(socket)
        await socket.disconnect()
        return [snapshot, added, removed, str(second.pk)]

    snapshot, added, removed, second_id = asyncio.run(scenario())

    assert (snapshot["type"], ids(snapshot["rows"]), snapshot["total"]) == ("page", [str(first.pk)], 1)
    assert added["type"] == "changes"
    assert (ids(added["upsert"]), added["order"], added["total"]) == (
        [second_id],
        [second_id, str(first.pk)],
        2,
    )
    assert added["upsert"][0]["client"] == "198.51.100.9"
    assert (removed["upsert"], removed["remove"], removed["order"]) == ([], [str(first.pk)], [second_id])


@pytest.mark.django_db(transaction=True)
def test_a_page_asks_for_a_search_and_gets_that_page(make_mailbox, live_node, fast_hashing):
    alice, bob = make_mailbox("alice@example.test"), make_mailbox("bob@example.test")
    open_session_row(alice)
    from_bob = open_session_row(bob)
    cookie = cookie_of(user("root", superuser=True))

    async def scenario() -> dict:
        socket = communicator(cookie)
        await socket.connect(timeout=RECEIVE_TIMEOUT)
        await receive(socket)
        await socket.send_json_to({"action": "view", "search": "bob", "page": 1})
        answer = await receive(socket)
        await socket.disconnect()
        return answer

    answer = asyncio.run(scenario())

    assert (answer["type"], ids(answer["rows"]), answer["total"]) == ("page", [str(from_bob.pk)], 1)


@pytest.mark.django_db(transaction=True)
def test_a_domain_administrator_gets_only_their_domains_sessions(make_mailbox, live_node, fast_hashing):
    ours, theirs = make_mailbox("mine@ours.test"), make_mailbox("other@theirs.test")
    mine = open_session_row(ours)
    open_session_row(theirs)
    services.save_domain_administrator(Actor.cli(), "olivia", ["ours.test"], "a long admin passphrase")
    cookie = cookie_of(get_user_model().objects.get(username="olivia"))

    async def scenario() -> tuple[dict, dict, str]:
        socket = communicator(cookie)
        connected, _ = await socket.connect(timeout=RECEIVE_TIMEOUT)
        assert connected
        snapshot = await receive(socket)
        await database_sync_to_async(open_session_row)(theirs)
        later = await database_sync_to_async(open_session_row)(ours)
        changes = await receive(socket)
        await socket.disconnect()
        return snapshot, changes, str(later.pk)

    snapshot, changes, later_id = asyncio.run(scenario())

    assert ids(snapshot["rows"]) == [str(mine.pk)]
    assert (ids(changes["upsert"]), changes["order"], changes["total"]) == (
        [later_id],
        [later_id, str(mine.pk)],
        2,
    )


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    "who",
    ["anonymous", "not staff", "staff without the view permission", "wrong origin"],
)
def test_the_socket_refuses_anyone_but_staff_who_may_view_from_our_origin(who, live_node, fast_hashing):
    cookie, origin = None, ORIGIN
    if who == "not staff":
        cookie = cookie_of(user("member", staff=False, permissions=("view_pop3session",)))
    elif who == "staff without the view permission":
        cookie = cookie_of(user("clerk"))
    elif who == "wrong origin":
        cookie, origin = cookie_of(user("root", superuser=True)), b"https://evil.example"

    async def scenario() -> bool:
        socket = communicator(cookie, origin)
        connected, _ = await socket.connect(timeout=RECEIVE_TIMEOUT)
        await socket.disconnect()
        return connected

    assert asyncio.run(scenario()) is False


@pytest.mark.django_db(transaction=True)
def test_with_redis_a_notice_from_runpop3_reaches_the_page(
    make_mailbox, live_node, fast_hashing, redis_layer
):
    mailbox = make_mailbox("alice@example.test")
    cookie = cookie_of(user("root", superuser=True))

    async def scenario() -> tuple[dict, str]:
        socket = communicator(cookie)
        await socket.connect(timeout=RECEIVE_TIMEOUT)
        await receive(socket)
        session = await database_sync_to_async(open_session_row)(mailbox)
        notice = await database_sync_to_async(feed.notice_about)([session.pk.hex])
        await get_channel_layer().group_send(feed.SESSIONS_GROUP, notice)
        changes = await receive(socket)
        await socket.disconnect()
        return changes, str(session.pk)

    changes, session_id = asyncio.run(scenario())

    assert (ids(changes["upsert"]), changes["order"]) == ([session_id], [session_id])


# --- The page and its kick --------------------------------------------------------------------


@pytest.mark.django_db
def test_the_page_is_for_staff_who_may_view_sessions(client, fast_hashing):
    assert client.get(PAGE_URL).status_code == 302  # to the login
    client.force_login(user("clerk"))
    assert client.get(PAGE_URL).status_code == 403
    client.force_login(user("viewer", permissions=("view_pop3session",)))
    page = client.get(PAGE_URL)
    assert page.status_code == 200
    assert LIVE_SESSIONS_SOCKET_PATH in page.content.decode()
    assert 'data-may-kick="false"' in page.content.decode()


@pytest.mark.django_db
def test_kicking_from_the_page_needs_the_kick_permission(make_mailbox, live_node, fast_hashing):
    mailbox = make_mailbox("alice@example.test")
    session = open_session_row(mailbox)
    viewer, kicker = Client(), Client()
    for client, name, permissions in (
        (viewer, "viewer", ("view_pop3session",)),
        (kicker, "kicker", ("view_pop3session", "kick_pop3session")),
    ):
        account = user(name, permissions=permissions)
        DomainAdministrator.objects.create(user=account, domain=mailbox.domain)
        client.force_login(account)

    refused = viewer.post(KICK_URL, {"session": str(session.pk)})
    assert refused.status_code == 403
    assert Pop3Session.objects.get(pk=session.pk).kick_requested_at is None

    kicked = kicker.post(KICK_URL, {"session": str(session.pk)})
    assert (kicked.status_code, kicked.json()) == (200, {"kicked": 1})
    assert Pop3Session.objects.get(pk=session.pk).kick_requested_at is not None
    assert AuditEntry.objects.filter(action="kick").values_list("actor_name", flat=True).get() == "kicker"
    assert kicker.post(KICK_URL, {"session": "not an id"}).status_code == 400


@pytest.mark.django_db
def test_a_kick_without_the_csrf_token_is_refused(make_mailbox, live_node, fast_hashing):
    session = open_session_row(make_mailbox("alice@example.test"))
    client = Client(enforce_csrf_checks=True)
    client.force_login(user("root", superuser=True))

    assert client.post(KICK_URL, {"session": str(session.pk)}).status_code == 403
    assert Pop3Session.objects.get(pk=session.pk).kick_requested_at is None


@pytest.mark.django_db
def test_a_domain_administrator_cannot_kick_another_domains_session(make_mailbox, live_node):
    theirs = open_session_row(make_mailbox("other@theirs.test"))
    make_mailbox("mine@ours.test")
    services.save_domain_administrator(Actor.cli(), "olivia", ["ours.test"], "a long admin passphrase")
    client = Client()
    client.force_login(get_user_model().objects.get(username="olivia"))

    answer = client.post(KICK_URL, {"session": str(theirs.pk)})

    assert (answer.status_code, answer.json()) == (200, {"kicked": 0})
    assert Pop3Session.objects.get(pk=theirs.pk).kick_requested_at is None
