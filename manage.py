#!/usr/bin/env python
"""Django's command-line utility for mailadmin."""

import os
import sys


def main() -> None:
    if sys.argv[1:2] == ["deliver"]:
        # Pipe delivery first tries a running runlmtp, before Django is imported (about a
        # second); it leaves the message to the command below when it cannot answer for it.
        from mailadmin.mailin.pipe import main as deliver_through_runlmtp

        code = deliver_through_runlmtp(sys.argv[2:])
        if code is not None:
            sys.exit(code)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mailadmin.settings")
    from django.core.management import execute_from_command_line

    try:
        execute_from_command_line(sys.argv)
    except BrokenPipeError:
        # The reader went away (`listmailboxes | head`): stop quietly, as other tools do.
        # Point stdout at /dev/null so the interpreter's final flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


if __name__ == "__main__":
    main()
