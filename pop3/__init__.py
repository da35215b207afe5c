"""A POP3 server library with no Django in it (RFC 1939, 2449, 2595, 3206, 5034).

The protocol core, session and asyncio server arrive with the runpop3 work; this package
must never import django, channels or mailadmin.
"""
