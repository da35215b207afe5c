"""``make bench``: POP3 and LMTP performance of live runpop3 / runlmtp processes on loopback.

A benchmark suite, not a test suite: it measures and reports, and asserts nothing about timings.
Run ``python -m bench --help``; docs/benchmarks.md describes every scenario and figure.

The bench process itself never imports Django: the corpus is built by ``python -m bench.corpus``
in a child process, and the servers are ``manage.py`` children, so the measuring side stays
small and its own memory and CPU never mix with the server's.
"""
