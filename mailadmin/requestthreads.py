"""A fixed set of threads for the sync part of Django's HTTP requests under daphne.

Django's ASGI handler gives each request a thread of its own (a ``ThreadSensitiveContext``
with a one-thread executor made for it) and joins it when the request ends: a thread started
and stopped per request, about a tenth of a web worker's CPU per API call, and as many threads
at once as requests arrive. ``RequestThreads`` enters each request into a context whose
executor is one of ``size`` long-lived one-thread executors, free at the time; a request that
finds none free waits for one. Django's own context then defers to it (the outermost context
with an executor wins), so views, middleware and the ORM run as before, one request per thread.

A request ``direct`` serves (``direct.serves(scope)``: the API, ``mailadmin.onehop``) is
handed to ``direct.handle_on`` with its thread instead, which runs it there in one hop.
"""

import asyncio
from concurrent.futures import ThreadPoolExecutor

from asgiref.sync import ThreadSensitiveContext


class RequestThreads:
    """ASGI middleware for HTTP: each request's sync work on one of ``size`` threads."""

    def __init__(self, application, size: int, direct=None) -> None:
        self.application = application
        self.size = size
        self.direct = direct
        self._idle: list[ThreadPoolExecutor] = []
        self._made = 0
        self._freed: asyncio.Condition | None = None

    async def __call__(self, scope, receive, send) -> None:
        executor = await self._take()
        try:
            if self.direct is not None and self.direct.serves(scope):
                await self.direct.handle_on(executor, scope, receive, send)
            else:
                async with ThreadSensitiveContext(executor=executor):
                    await self.application(scope, receive, send)
        finally:
            await self._give_back(executor)

    async def _take(self) -> ThreadPoolExecutor:
        if self._freed is None:
            self._freed = asyncio.Condition()
        async with self._freed:
            while not self._idle and self._made >= self.size:
                await self._freed.wait()
            if self._idle:
                return self._idle.pop()
            self._made += 1
            return ThreadPoolExecutor(max_workers=1, thread_name_prefix="request")

    async def _give_back(self, executor: ThreadPoolExecutor) -> None:
        async with self._freed:
            self._idle.append(executor)
            self._freed.notify()
