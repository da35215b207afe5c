"""Tokens and requests for the API tests: a token made through the service layer, a client
that sends it as ``Authorization: Bearer`` from a chosen address, and a hash accepted today."""

import json
from dataclasses import dataclass

from django.contrib.auth.hashers import PBKDF2PasswordHasher
from django.test import Client

from mailadmin.hosting import services
from mailadmin.hosting.actors import Actor

# A PBKDF2 hash at a low iteration count: checkable here, cheap to make in a test.
PASSWORD = "ample tender walrus"
PASSWORD_HASH = PBKDF2PasswordHasher().encode(PASSWORD, "fixedsalt", iterations=1000)


def make_token(*domains: str, scope: str = "write", **options) -> str:
    return services.create_token(
        Actor.cli(), domain_names=list(domains), scope=scope, name="test", **options
    ).secret


@dataclass
class Api:
    """Requests to /api/v1/ with one token, from one client address."""

    token: str | None
    address: str = "192.0.2.10"

    def __post_init__(self) -> None:
        self.client = Client()

    def call(self, method: str, path: str, body=None, *, content_type="application/json", **headers):
        extra = {"REMOTE_ADDR": self.address, **headers}
        if self.token is not None:
            extra["HTTP_AUTHORIZATION"] = f"Bearer {self.token}"
        data = body if body is None or isinstance(body, str | bytes) else json.dumps(body)
        send = getattr(self.client, method.lower())
        if data is None:
            return send(f"/api/v1/{path}", **extra)
        return send(f"/api/v1/{path}", data=data, content_type=content_type, **extra)

    def get(self, path: str, **headers):
        return self.call("GET", path, **headers)

    def put(self, path: str, body, **headers):
        return self.call("PUT", path, body, **headers)

    def patch(self, path: str, body, **headers):
        return self.call("PATCH", path, body, **headers)

    def post(self, path: str, body=None, **headers):
        return self.call("POST", path, body, **headers)

    def delete(self, path: str, **headers):
        return self.call("DELETE", path, **headers)
