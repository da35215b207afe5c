"""Django's HTTP requests under daphne run their sync part on a fixed set of long-lived threads
(``RequestThreads``), not on a thread started and joined for each request."""

import asyncio
import threading

import pytest
from asgiref.sync import ThreadSensitiveContext, sync_to_async

from mailadmin.requestthreads import RequestThreads


class DjangoLike:
    """Does what Django's ASGI handler does with threads: enters a ThreadSensitiveContext of its
    own, then runs sync code (middleware, view, ORM) thread-sensitively."""

    def __init__(self, release: threading.Event | None = None) -> None:
        self.release = release
        self.threads: list[threading.Thread] = []  # the objects: a thread's ident is reused once it ends
        self.running = 0
        self.most_at_once = 0

    def view(self) -> None:
        self.threads.append(threading.current_thread())
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        if self.release is not None:
            assert self.release.wait(timeout=30)
        self.running -= 1

    async def __call__(self, scope, receive, send) -> None:
        async with ThreadSensitiveContext():
            await sync_to_async(self.view)()
            await sync_to_async(self.view)()


async def request(application) -> None:
    await application({"type": "http"}, None, None)


def test_requests_one_after_another_reuse_one_thread():
    django = DjangoLike()

    async def main():
        threads = RequestThreads(django, size=4)
        for _ in range(5):
            await request(threads)

    asyncio.run(main())
    assert len(django.threads) == 10
    assert len(set(django.threads)) == 1
    assert threading.current_thread() not in django.threads


def test_without_them_every_request_had_a_thread_of_its_own():
    """What Django does alone: the same five requests start five threads."""
    django = DjangoLike()

    async def main():
        for _ in range(5):
            await request(django)

    asyncio.run(main())
    assert len(set(django.threads)) == 5


def test_at_most_size_requests_run_at_once_and_the_rest_wait_for_a_thread():
    release = threading.Event()
    django = DjangoLike(release)

    async def main():
        threads = RequestThreads(django, size=2)
        pending = [asyncio.create_task(request(threads)) for _ in range(5)]
        while django.running < 2:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # a third request, were it let in, would be running by now
        assert django.running == 2
        release.set()
        await asyncio.gather(*pending)

    asyncio.run(main())
    assert django.most_at_once == 2
    assert len(django.threads) == 10
    assert len(set(django.threads)) == 2


def test_a_failing_request_gives_its_thread_back():
    class Failing(DjangoLike):
        async def __call__(self, scope, receive, send) -> None:
            await super().__call__(scope, receive, send)
            raise RuntimeError("view failed")

    django = Failing()

    async def main():
        threads = RequestThreads(django, size=1)
        for _ in range(3):
            with pytest.raises(RuntimeError):
                await request(threads)

    asyncio.run(main())
    assert len(django.threads) == 6
    assert len(set(django.threads)) == 1
