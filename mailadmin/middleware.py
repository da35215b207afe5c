"""Keep Django's middleware in one thread hop under daphne.

Under ASGI Django runs each async-capable ``MiddlewareMixin`` middleware in async mode, and
then every ``process_request`` and ``process_response`` hook of each is a ``sync_to_async``
hop to Django's one sync thread and back: about fifteen hops per request with this project's
middleware, each a context switch on the thread every sync view already queues on. The stack is
built from the innermost middleware outwards, each taking the mode of the handler below it
when it can, so one sync-only middleware at the bottom puts the whole stack in sync mode: one
hop into the sync thread for all of it, one back to the loop for Django's view dispatch, and
the sync view itself runs on the same waiting thread. ``SyncMiddlewareChain`` is that
middleware; it does nothing else and must stay the last entry of ``MIDDLEWARE``.
"""


class SyncMiddlewareChain:
    sync_capable = True
    async_capable = False

    def __init__(self, get_response) -> None:
        self.get_response = get_response

    def __call__(self, request):
        return self.get_response(request)
