"""System checks for configuration mistakes in the POP3 server's set-up.

Each catches a set-up that would otherwise fail later and less clearly: a TLS file that
runpop3 cannot read. (Several worker processes without Redis need no note: they are the
default on a host of several cores, and the console learns of sessions from the database.)
They concern runpop3 alone, so they are deployment checks (``manage.py
check --deploy``) that runpop3 also runs at start, not checks every command runs: the pipe
``deliver`` runs as a user who should not be able to read the TLS key at all.
"""

import os

from django.conf import settings
from django.core.checks import Error, register

POP3_TAG = "mailadmin_pop3"


@register(POP3_TAG, deploy=True)
def tls_files_readable(app_configs=None, **kwargs) -> list[Error]:
    """POP3_TLS_CERTFILE and POP3_TLS_KEYFILE, when set, name files this process can read."""
    errors = []
    for name in ("POP3_TLS_CERTFILE", "POP3_TLS_KEYFILE"):
        path = getattr(settings, name)
        if path and not (os.path.isfile(path) and os.access(path, os.R_OK)):
            errors.append(
                Error(
                    f"{name} names {path!r}, which is not a readable file.",
                    hint="Fix the path or the file's permissions for the user runpop3 runs as.",
                    id="mailadmin.E001",
                )
            )
    if bool(settings.POP3_TLS_CERTFILE) != bool(settings.POP3_TLS_KEYFILE):
        errors.append(
            Error(
                "Only one of POP3_TLS_CERTFILE and POP3_TLS_KEYFILE is set.",
                hint="Set both (certificate chain and private key), or neither.",
                id="mailadmin.E002",
            )
        )
    return errors
