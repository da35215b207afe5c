"""Scripts the tests run as separate processes (``python -m tests.workers.NAME``)."""
