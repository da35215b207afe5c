"""Run every listener of one host in the foreground: the web admin, POP3/POP3S and LMTP.

For `make run` and small single-host installs. Ctrl-C or SIGTERM stops them all; if one
listener dies, the others are stopped too and the one that failed is named, so a supervisor
(or a person) sees the failure. Once every listener is up (the web admin accepts connections,
the mail listeners have said they listen) it says so (with ``--demo``, with the demo's URLs and
credentials), so nothing important scrolls away under start-up logs; requests for static files
are left out of the web access log.
"""

import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO

from django.conf import settings
from django.core.management.base import BaseCommand

from mailadmin.management.commands import setupdemo
from mailadmin.prefork import die_with_parent, stop_children

STOP_GRACE_SECONDS = 10
POLL_SECONDS = 0.2
STATIC_REQUEST = re.compile(r'"(GET|HEAD) /static/')
LISTENING = re.compile(r"\b(POP3S?|LMTP) listening on ")


class Command(BaseCommand):
    help = "Run the web admin (runweb) and the POP3/LMTP listeners until interrupted."

    def add_arguments(self, parser):
        parser.add_argument("--bind", default="127.0.0.1", help="Address for the web admin.")
        parser.add_argument("--http-port", type=int, default=8000, help="Port for the web admin.")
        parser.add_argument(
            "--demo", action="store_true", help="Print the demo's URLs and credentials once all are up."
        )

    def handle(self, *args, bind: str, http_port: int, demo: bool, **options):
        self.listening: set[str] = set()  # the mail listeners that said they are listening
        children = self._start(bind, http_port)
        listeners = self._listeners(bind, http_port)
        stopping = False

        def stop(signum, frame):
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        announced = False
        while not stopping and all(child.poll() is None for child in children.values()):
            if not announced and self._all_up(listeners):
                self._announce(http_port, listeners, demo)
                announced = True
            time.sleep(POLL_SECONDS)
        stop_children(children.values(), STOP_GRACE_SECONDS)
        failed = {
            name: child.returncode
            for name, child in children.items()
            if child.returncode not in (0, -signal.SIGTERM, -signal.SIGINT)
        }
        if failed and not stopping:
            for name, status in failed.items():
                self.stderr.write(
                    f"{name} stopped with exit status {status}; the other listeners were stopped."
                )
            sys.exit(1)

    def _start(self, bind: str, http_port: int) -> dict[str, subprocess.Popen]:
        manage = [sys.executable, str(settings.BASE_DIR / "manage.py")]
        web = [*manage, "runweb", "--bind", bind, "--port", str(http_port)]
        children = {
            name: subprocess.Popen(command, stdout=subprocess.PIPE, text=True, preexec_fn=_die_with_parent)
            for name, command in (
                ("runweb", web),
                ("runpop3", [*manage, "runpop3"]),
                ("runlmtp", [*manage, "runlmtp"]),
            )
        }
        for child in children.values():
            threading.Thread(target=self._forward, args=(child.stdout,), daemon=True).start()
        return children

    def _forward(self, lines: IO[str]) -> None:
        """A child's output, less the dozens of access-log lines each admin page's assets cost;
        the mail listeners' "X listening on" lines say they are up."""
        for line in lines:
            if STATIC_REQUEST.search(line):
                continue
            if match := LISTENING.search(line):
                self.listening.add(match[1])
            sys.stdout.write(line)
            sys.stdout.flush()

    def _all_up(self, listeners: dict) -> bool:
        """The web admin accepts connections (a bare connect leaves no trace there), and every
        mail listener said it listens: connecting to those would record a session each."""
        mail = {name for name in listeners if name != "Web"}
        return mail <= self.listening and _accepting(listeners["Web"])

    def _listeners(self, bind: str, http_port: int) -> dict[str, tuple[str, int] | str]:
        """What each listener should answer on, as runpop3 and runlmtp read their settings."""
        listeners: dict[str, tuple[str, int] | str] = {"Web": (bind, http_port)}
        if settings.POP3_PORT:
            listeners["POP3"] = (settings.POP3_BIND, settings.POP3_PORT)
        if settings.POP3S_PORT and settings.POP3_TLS_CERTFILE:
            listeners["POP3S"] = (settings.POP3_BIND, settings.POP3S_PORT)
        listeners["LMTP"] = settings.LMTP_SOCKET or (settings.LMTP_BIND, settings.LMTP_PORT)
        return listeners

    def _announce(self, http_port: int, listeners: dict, demo: bool) -> None:
        where = {
            name: address if isinstance(address, str) else f"{address[0]}:{address[1]}"
            for name, address in listeners.items()
            if name != "Web"
        }
        if "POP3" in where and "POP3S" in where:
            where["POP3"] += " (STLS)"
        if demo:
            self.stdout.write(setupdemo.banner(http_port, where))
        else:
            self.stdout.write("Listening: " + ", ".join(f"{name} {at}" for name, at in where.items()))
        self.stdout.flush()


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when runall dies, even by SIGKILL (Linux prctl)."""
    die_with_parent(signal.SIGTERM)


def _accepting(address: tuple[str, int]) -> bool:
    try:
        socket.create_connection(address, timeout=POLL_SECONDS).close()
    except OSError:
        return False
    return True
