"""The live sessions page under churn: how long a POP3 login takes to show on an open page.

A websocket client plays the operator's browser: signed in (a session cookie), it searches the
page for the next probe's address, then the probe logs in over POP3, and the delay is from the
reply to PASS until the row (logged in) arrives on the socket. Each probe logs in after a wait
drawn between 0 and 1 s: one sent as soon as the last row arrived would log in just after a
monitor tick every time, and measure one phase of the ticks, looks and page updates only.
Meanwhile one thread churns through the held sessions, ending each and logging it in again, so
the session table changes all the time, as it does with many clients polling.
"""

import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from websockets.sync.client import connect

from bench import corpus
from bench.clients import HOST, Pop3, ProtocolError

SOCKET_PATH = "/admin/sessions/live/socket/"
ARRIVAL_TIMEOUT_SECONDS = 10.0
CLIENT_ERRORS = (ProtocolError, OSError, EOFError)
OPENING_THREADS = 4


def hold(port: int, users: list[str]) -> dict[str, Pop3]:
    """A logged-in session per user (those that could log in), opened a few at a time."""

    def open_one(user: str) -> Pop3 | None:
        try:
            client = Pop3.connect(port)
            client.login(user, corpus.PASSWORD)
            return client
        except CLIENT_ERRORS:
            return None

    with ThreadPoolExecutor(OPENING_THREADS) as pool:
        opened = dict(zip(users, pool.map(open_one, users), strict=True))
    return {user: client for user, client in opened.items() if client is not None}


class LivePage:
    """A websocket client of the live sessions page: notes when each address first arrives."""

    def __init__(self, port: int, session_key: str) -> None:
        self.socket = connect(
            f"ws://{HOST}:{port}{SOCKET_PATH}",
            origin=f"http://{HOST}:{port}",
            additional_headers={"Cookie": f"sessionid={session_key}"},
            open_timeout=30,
        )
        self.arrived: dict[str, float] = {}
        self.pages = 0  # whole pages received (answers to a search)
        self.messages = 0
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for text in self.socket:
            now = time.perf_counter()
            message = json.loads(text)
            rows = message["rows"] if message["type"] == "page" else message["upsert"]
            with self.changed:
                self.messages += 1
                self.pages += message["type"] == "page"
                for row in rows:
                    if row["state"] == "transaction":
                        self.arrived.setdefault(row["address"], now)
                self.changed.notify_all()

    def _wait(self, condition: Callable[[], bool], timeout: float) -> bool:
        with self.changed:
            return self.changed.wait_for(condition, timeout)

    def search(self, text: str) -> None:
        """Show only rows matching ``text``; returns once the page has answered."""
        pages = self.pages
        self.socket.send(json.dumps({"action": "view", "search": text, "page": 1}))
        if not self._wait(lambda: self.pages > pages, ARRIVAL_TIMEOUT_SECONDS):
            raise TimeoutError("the live page did not answer a search")
        with self.changed:
            self.arrived.pop(text, None)

    def arrival(self, address: str) -> float | None:
        """When a logged-in row of ``address`` arrived (perf_counter), waiting for it a while."""
        self._wait(lambda: address in self.arrived, ARRIVAL_TIMEOUT_SECONDS)
        with self.changed:
            return self.arrived.get(address)

    def close(self) -> None:
        self.socket.close()


class Churn:
    """Ends held sessions one after another and logs each mailbox in again, until stopped."""

    def __init__(self, port: int, sessions: dict[str, Pop3]) -> None:
        self.port = port
        self.sessions = sessions
        self.cycles = 0
        self.errors = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.is_set():
            for user in list(self.sessions):
                if self.stopping.is_set():
                    return
                try:
                    self.sessions.pop(user).quit()
                    client = Pop3.connect(self.port)
                    client.login(user, corpus.PASSWORD)
                    self.sessions[user] = client
                    self.cycles += 1
                except CLIENT_ERRORS:
                    self.errors += 1

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join()


def probe(page: LivePage, port: int, address: str, wait: float = 0.0) -> float | None:
    """Seconds from a login of ``address``, ``wait`` seconds after the page showed its search,
    to its row on the page; None if it never came."""
    page.search(address)
    time.sleep(wait)
    client = Pop3.connect(port)
    client.login(address, corpus.PASSWORD)
    logged_in = time.perf_counter()
    arrived = page.arrival(address)
    client.quit()
    return None if arrived is None else max(0.0, arrived - logged_in)
