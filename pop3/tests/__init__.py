"""The POP3 library's own tests: transcripts and properties that need no Django, database or socket
(except test_server.py's loopback listeners)."""
