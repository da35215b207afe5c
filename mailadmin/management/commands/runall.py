"""Run every listener of one host in the foreground: the web admin and, where built, POP3 and LMTP.

For `make run` and small single-host installs. Ctrl-C or SIGTERM stops them all; if one
listener dies, the others are stopped too, so a supervisor sees the failure.
"""

import signal
import subprocess
import sys
import time

from django.conf import settings
from django.core.management import get_commands
from django.core.management.base import BaseCommand

STOP_GRACE_SECONDS = 10
POLL_SECONDS = 0.2


class Command(BaseCommand):
    help = "Run daphne (web admin) and the POP3/LMTP listeners until interrupted."

    def add_arguments(self, parser):
        parser.add_argument("--bind", default="127.0.0.1", help="Address for the web admin.")
        parser.add_argument("--http-port", type=int, default=8000, help="Port for the web admin.")

    def handle(self, *args, bind: str, http_port: int, **options):
        children = [subprocess.Popen(command) for command in self._commands(bind, http_port)]
        stopping = False

        def stop(signum, frame):
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        while not stopping and all(child.poll() is None for child in children):
            time.sleep(POLL_SECONDS)
        self._stop(children)
        failed = [child for child in children if child.returncode not in (0, -signal.SIGTERM, -signal.SIGINT)]
        if failed and not stopping:
            sys.exit(1)

    def _commands(self, bind: str, http_port: int) -> list[list[str]]:
        manage = [sys.executable, str(settings.BASE_DIR / "manage.py")]
        commands = [
            [sys.executable, "-m", "daphne", "-b", bind, "-p", str(http_port), "mailadmin.asgi:application"]
        ]
        available = get_commands()
        commands += [[*manage, name] for name in ("runpop3", "runlmtp") if name in available]
        return commands

    def _stop(self, children: list[subprocess.Popen]) -> None:
        for child in children:
            if child.poll() is None:
                child.terminate()
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for child in children:
            try:
                child.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
