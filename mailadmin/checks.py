"""System checks for configuration mistakes in the POP3 server's set-up.

Each catches a set-up that would otherwise fail later and less clearly: a TLS file that
runpop3 cannot read, and an in-memory channel layer that silently keeps each process's live
updates to itself. They concern runpop3 alone, so they are deployment checks (``manage.py
check --deploy``) that runpop3 also runs at start, not checks every command runs: the pipe
``deliver`` runs as a user who should not be able to read the TLS key at all.
"""

import os

from django.conf import settings
from django.core.checks import Error, Warning, register

IN_MEMORY_LAYER = "channels.layers.InMemoryChannelLayer"
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


@register(POP3_TAG, deploy=True)
def channel_layer_crosses_processes(app_configs=None, **kwargs) -> list[Warning]:
    """Several POP3 worker processes need a channel layer they share; the in-memory one is per process.

    Only runpop3 has live state to publish (its sessions); LMTP workers publish nothing.
    """
    backend = settings.CHANNEL_LAYERS.get("default", {}).get("BACKEND", "")
    if backend != IN_MEMORY_LAYER or settings.POP3_WORKERS <= 1:
        return []
    return [
        Warning(
            f"The in-memory channel layer does not cross processes, and POP3_WORKERS={settings.POP3_WORKERS} "
            "runs several.",
            hint="Set REDIS_URL so live updates reach every process; without it the web console "
            "learns of sessions only from the database, a poll later.",
            id="mailadmin.W001",
        )
    ]
