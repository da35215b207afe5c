"""``runweb [--bind ADDRESS] [--port N] [--workers N|auto] [-- DAPHNE-OPTIONS]``: the web admin,
the console and the API, served by daphne in ``WEB_WORKERS`` processes on one port."""

import argparse
import socket

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from mailadmin import webworkers
from mailadmin.prefork import worker_count_argument


class Command(BaseCommand):
    help = (
        "Serve the web admin, the console and the API with daphne in several processes on one "
        "port, handing each connection to the next in turn; options after -- are passed to each "
        "daphne (e.g. -- --proxy-headers)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--bind", default="127.0.0.1", help="IPv4 address (default 127.0.0.1).")
        parser.add_argument("--port", type=int, default=8000, help="Port to listen on (default 8000).")
        parser.add_argument(
            "--workers",
            type=worker_count_argument,
            default=settings.WEB_WORKERS,
            help="daphne processes: a number, or auto for one per CPU (default WEB_WORKERS).",
        )
        parser.add_argument("daphne_options", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)

    def handle(self, *args, bind: str, port: int, workers: int, daphne_options: list[str], **options):
        daphne_options = daphne_options[1:] if daphne_options[:1] == ["--"] else daphne_options
        try:
            listener = webworkers.bind(bind, port)
        except (OSError, socket.gaierror) as error:
            raise CommandError(f"cannot listen on {bind}:{port}: {error}") from None

        def started() -> None:
            self.stdout.write(f"Web listening on {bind}:{port} ({workers} daphne processes)")
            self.stdout.flush()

        raise SystemExit(webworkers.run(listener, workers, daphne_options, started))
