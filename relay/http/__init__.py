"""Sans-IO HTTP: bytes and headers in, decisions out; no sockets, no asyncio."""
