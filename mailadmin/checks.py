"""System checks (``manage.py check``, and every command at start) for configuration mistakes.

Each catches a set-up that would otherwise fail later and less clearly: a TLS file that
runpop3 cannot read fails at the first POP3S handshake's set-up, and an in-memory channel
layer silently keeps each process's live updates to itself.
"""

import os

from django.conf import settings
from django.core.checks import Error, Warning, register

IN_MEMORY_LAYER = "channels.layers.InMemoryChannelLayer"


@register()
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


@register()
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
