"""Create (or refresh) the demo admin, domain and mailbox that `make run` prints.

The credentials are kept in ``var/demo-credentials.json``; ``runall --demo`` prints them with
the URLs and ports once every listener is up, so they do not scroll away under start-up logs.
"""

import email.utils
import json
import os
import secrets
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand

from mailadmin.hosting import services, store
from mailadmin.hosting.actors import Actor
from mailadmin.mailin.delivery import deliver

DEMO_DOMAIN = "example.test"
DEMO_ADDRESS = f"demo@{DEMO_DOMAIN}"
ADMIN_USERNAME = "admin"
DEMO_MESSAGES = [
    ("Welcome to mailadmin", "This mailbox was created by `make run`.\nFetch it with any POP3 client.\n"),
    (
        "A line starting with a dot",
        "The next line starts with a dot:\n.hidden\n.\nand the message goes on.\n",
    ),
    ("Quota", "Every message counts against the mailbox's quota of 100 MiB.\n"),
]


def credentials_path() -> Path:
    return settings.VAR_DIR / "demo-credentials.json"


def banner(http_port: int, listening: dict[str, str]) -> str:
    """What `make run` prints once every listener is up: where to go, and how to log in."""
    credentials = json.loads(credentials_path().read_text())
    lines = [
        "",
        f"  Web admin:  http://127.0.0.1:{http_port}/admin/",
        f"              user {ADMIN_USERNAME}, password {credentials['admin']}",
        f"  Mailbox:    {DEMO_ADDRESS}, password {credentials['mailbox']}",
        f"  Kept in:    {credentials_path()}",
        f"  TLS files:  {settings.VAR_DIR / 'tls'}/cert.pem, key.pem (self-signed)",
        *(f"  {name + ':':<11} {where}" for name, where in listening.items()),
        "",
    ]
    return "\n".join(lines)


class Command(BaseCommand):
    help = "Create the demo superuser, domain and mailbox with a few messages; keep their credentials."

    def handle(self, *args, **options):
        credentials = self._credentials()
        self._ensure_admin(credentials["admin"])
        self._ensure_mailbox(credentials["mailbox"])
        self.stdout.write(f"Demo data ready; its credentials are in {credentials_path()}.")

    def _credentials(self) -> dict[str, str]:
        """Random passwords, made once and kept in var/ so every `make run` prints the same."""
        path = credentials_path()
        if path.exists():
            return json.loads(path.read_text())
        credentials = {"admin": secrets.token_urlsafe(9), "mailbox": secrets.token_urlsafe(9)}
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(credentials))
        return credentials

    def _ensure_admin(self, password: str) -> None:
        user_model = get_user_model()
        admin, _ = user_model.objects.get_or_create(username=ADMIN_USERNAME)
        admin.is_staff = admin.is_superuser = True
        admin.set_password(password)
        admin.save()

    def _ensure_mailbox(self, password: str) -> None:
        actor = Actor.cli()
        try:
            services.get_mailbox(actor, DEMO_ADDRESS)
        except store.MailboxNotFound:
            services.create_mailbox(
                actor, DEMO_ADDRESS, password=password, quota_bytes=100 * 1024**2, create_domain=True
            )
            for subject, body in DEMO_MESSAGES:
                headers = (
                    f"From: mailadmin <postmaster@{DEMO_DOMAIN}>\nTo: {DEMO_ADDRESS}\nSubject: {subject}\n"
                    f"Date: {email.utils.formatdate()}\n"
                    f"Message-ID: {email.utils.make_msgid(domain=DEMO_DOMAIN)}\n"
                )
                message = f"{headers}\n{body}"
                deliver([DEMO_ADDRESS], [message.encode()], sender=f"postmaster@{DEMO_DOMAIN}")
        else:
            services.set_password(actor, DEMO_ADDRESS, password)
