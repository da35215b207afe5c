"""``python -m bench.tokencheck TOKEN N``: the CPU one Bearer check costs, printed as JSON.

Runs the API's authentication class on a request ``N`` times in this process (Django set up
against the bench database): the token's row and domains are read each time, as for every
request. With PostgreSQL the database server's own CPU is not in the figure; with SQLite it is.
"""

import json
import sys
import time

import django

WARM_UP = 50


def main(token: str, checks: int) -> dict:
    django.setup()
    from django.test import RequestFactory
    from rest_framework.request import Request

    from mailadmin.api.authentication import BearerTokenAuthentication
    from mailadmin.hosting import tokens

    request = Request(
        RequestFactory().get(
            "/api/v1/domains/", HTTP_AUTHORIZATION=f"Bearer {token}", REMOTE_ADDR="127.0.0.1"
        )
    )
    authentication = BearerTokenAuthentication()
    for _ in range(WARM_UP):
        authentication.authenticate(request)
    started = time.process_time()
    for _ in range(checks):
        actor, _token = authentication.authenticate(request)
    cpu = time.process_time() - started
    digest = tokens.digest(token)
    digest_started = time.process_time()
    for _ in range(checks):
        tokens.matches(token, digest)
    digest_cpu = time.process_time() - digest_started
    return {
        "checks": checks,
        "cpu_ms_per_check": round(cpu * 1000 / checks, 4),
        "digest_us_per_check": round(digest_cpu * 1e6 / checks, 2),
        "actor": actor.name,
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]))))
