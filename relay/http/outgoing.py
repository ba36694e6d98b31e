"""Sans-IO: the request as it goes upstream, head and body, and what a retry replays.

relay writes the upstream request itself: the head from fields h11 already
validated when it parsed the client's request (plus relay's own), the body
as it came (``Content-Length``) or re-chunked (the client sent chunks, which
h11 decoded). The pieces sent so far are kept, up to a limit, so that a
pooled connection that turns out to be closed can be replaced by a fresh one
and the request replayed (Envoy's retry buffer has the same role).
"""

from __future__ import annotations

from collections.abc import Iterable

from .framing import LAST_CHUNK
from .headers import HeaderList, request_head

__all__ = ["REPLAY_LIMIT", "OutgoingRequest"]

#: Request bytes kept for replaying on a fresh connection. LLM requests are
#: small JSON; a bigger body is streamed without a safety net.
REPLAY_LIMIT = 1024 * 1024


class OutgoingRequest:
    """What to write upstream, step by step; the caller writes the bytes it returns.

    ``head_sent`` turns true with :meth:`head`; ``complete`` when the whole
    request (its end included) has been handed out.
    """

    def __init__(
        self,
        method: bytes,
        target: bytes,
        headers: HeaderList,
        *,
        chunked: bool,
        replay_limit: int = REPLAY_LIMIT,
    ) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.chunked = chunked
        self.head_sent = False
        self.complete = False
        self.replay: list[bytes] | None = []  # pieces handed out so far (None: too many)
        self._replay_size = 0
        self._replay_limit = replay_limit

    def replace_body(self, pieces: list[bytes], length: int) -> None:
        """The whole (inspected, maybe rewritten) body, sent with a Content-Length."""
        framing = (b"content-length", b"transfer-encoding")
        self.headers = [(n, v) for n, v in self.headers if n not in framing]
        self.headers.append((b"content-length", b"%d" % length))
        self.chunked = False
        self.replay = pieces

    def remember(self, data: bytes) -> bool:
        """Keep ``data`` for a replay; false once the body is too big to replay."""
        if self.replay is None:
            return False
        self._replay_size += len(data)
        if self._replay_size > self._replay_limit:
            self.replay = None
            return False
        self.replay.append(data)
        return True

    def frames(self, pieces: Iterable[bytes]) -> list[bytes]:
        """Body pieces as they go upstream: as they are, or each as one chunk."""
        if not self.chunked:
            return [piece for piece in pieces if piece]
        out: list[bytes] = []
        for piece in pieces:
            if piece:
                out += (b"%x\r\n" % len(piece), piece, b"\r\n")
        return out

    def head(self, first: bytes = b"", *, ends: bool) -> list[bytes]:
        """The head with the body handed out so far (and ``first``), for one write.

        ``ends``: the client's request is complete, so its end goes too.
        """
        parts = [request_head(self.method, self.target, self.headers)]
        replay = self.replay
        self.head_sent = True
        if self.chunked:
            if replay:
                parts += self.frames(replay)
            if first:
                parts += self.frames((first,))
            if ends:
                parts += self.end()
            return parts
        # A sized body (the usual): :meth:`frames` and :meth:`end` inline.
        if replay:
            parts += filter(None, replay)
        if first:
            parts.append(first)
        if ends:
            self.complete = True
        return parts

    def end(self) -> list[bytes]:
        """The request's end: the last chunk, or nothing for a sized body."""
        self.complete = True
        return [LAST_CHUNK] if self.chunked else []

    def retry(self) -> None:
        """A fresh connection: everything goes out again from the head."""
        self.head_sent = self.complete = False
