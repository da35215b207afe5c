"""One web worker of ``runweb``: daphne's command line, after setting up Django's database
connections for a web process (``executors.pool_connections``).

``python -m mailadmin.webworker DAPHNE-ARGUMENTS``; ``runweb`` starts it.
"""

import os
import sys


def main(argv: list[str]) -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mailadmin.settings")
    import django

    django.setup()
    from daphne.cli import CommandLineInterface
    from django.conf import settings

    from mailadmin.executors import pool_connections
    from mailadmin.webworkers import announce_ready

    pool_connections(settings.WEB_THREADS)
    announce_ready()
    CommandLineInterface().run(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
