"""Where runlmtp listens: ``LMTP_SOCKET``, or ``LMTP_BIND`` and ``LMTP_PORT``.

Standard library only. ``settings`` reads these variables through this module, and so does the
pipe's fast path (:mod:`mailadmin.mailin.pipe`), which has to find runlmtp without importing
Django's settings: their imports alone cost more than the whole fast path.
"""

from collections.abc import Mapping

DEFAULT_BIND = "127.0.0.1"
DEFAULT_PORT = 2424


def listen_address(environ: Mapping[str, str]) -> tuple[str, int, str]:
    """(bind address, TCP port, unix socket path or ""); ValueError when LMTP_PORT is no number."""
    port = environ.get("LMTP_PORT") or ""
    return (
        environ.get("LMTP_BIND", DEFAULT_BIND),
        int(port) if port else DEFAULT_PORT,
        environ.get("LMTP_SOCKET", ""),
    )
