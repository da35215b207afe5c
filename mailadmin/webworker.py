"""One web worker of ``runweb``: daphne's command line, after setting up Django's database
connections for a web process (``executors.pool_connections``), serving the connections
``runweb`` hands over (``webworkers.serve_handed_connections``).

``python -m mailadmin.webworker DAPHNE-ARGUMENTS``; ``runweb`` starts it.
"""

import os
import sys


def main(argv: list[str]) -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mailadmin.settings")
    import django

    django.setup()
    from daphne.cli import CommandLineInterface
    from daphne.server import Server
    from django.conf import settings
    from twisted.internet import reactor

    from mailadmin.executors import pool_connections
    from mailadmin.webworkers import announce_ready, serve_handed_connections

    class HandedConnectionsServer(Server):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            serve_handed_connections(self, reactor)

    class WorkerCommandLine(CommandLineInterface):
        server_class = HandedConnectionsServer

    pool_connections(settings.WEB_THREADS)
    announce_ready()
    WorkerCommandLine().run(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
