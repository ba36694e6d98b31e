"""relay: an asyncio HTTP/1.1 stream relay for LLM inference servers that never buffers."""

__version__ = "0.2.0"
