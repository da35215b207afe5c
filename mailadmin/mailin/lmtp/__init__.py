"""LMTP (RFC 2033): a sans-IO protocol core (``protocol``), and the asyncio server around it (``server``)."""
