"""Sans-IO: a request body held whole so that relay can read (and rewrite) its model.

Aliasing, pinning and routing need the model a JSON body names before the
body may go upstream. The body is held within a server-wide budget and scanned
in bounded steps (:meth:`BodyInspection.scan`): the caller scans a few
thousand steps per loop turn, so one huge or bracket-dense body never stalls
other streams. At its end the model value is spliced in place: the held
pieces go out with only that span replaced, never joined into one buffer.
"""

from __future__ import annotations

from .errors import RelayError
from .rewrite import (
    MAX_DEPTH,
    MAX_MODEL_VALUE_BYTES,
    InspectBudget,
    ModelMap,
    ModelScanner,
    Rewrite,
    ScanStatus,
    rewrite_pieces,
)

__all__ = ["BodyInspection"]

UNREADABLE = RelayError(
    400,
    "relay could not read the model of this request body: it must be UTF-8 JSON, with a "
    f"model value under {MAX_MODEL_VALUE_BYTES // 1024} KiB and nesting under {MAX_DEPTH} levels",
)
TOO_LARGE = RelayError(413, "request body too large for relay to read its model")
TOO_MANY = RelayError(
    503,
    "relay is reading too many request bodies at once; retry shortly",
    headers=((b"retry-after", b"1"),),
)


class BodyInspection:
    """One request body on its way through inspection.

    ``must_read`` (pinning or routing is configured): a body whose model
    relay cannot read is refused rather than passed to an upstream that
    might read it. :meth:`release` gives the budget back and is idempotent.
    """

    def __init__(self, budget: InspectBudget, model_map: ModelMap, *, must_read: bool) -> None:
        self.pieces: list[bytes] = []
        self._scanner = ModelScanner()
        self._hold = budget.hold()
        self._model_map = model_map
        self._must_read = must_read

    def add(self, data: bytes) -> RelayError | None:
        """Hold one more piece, queued for :meth:`scan`; an error when the budget
        cannot take it."""
        hold = self._hold
        if not hold.add(len(data)):
            alone_too_big = hold.size + len(data) > hold.limit
            hold.release()
            return TOO_LARGE if alone_too_big else TOO_MANY
        self.pieces.append(data)
        self._scanner.add(data)
        return None

    def scan(self, steps: int) -> bool:
        """Scan held bytes for at most about ``steps`` steps; whether all are scanned."""
        return self._scanner.advance(steps)

    @property
    def scanned(self) -> bool:
        """Whether every held byte has been scanned (``finish`` then costs little)."""
        return not self._scanner.pending

    def finish(self) -> Rewrite | RelayError:
        """The body is complete: the pieces to send (model rewritten), or an error."""
        scan = self._scanner.finish()
        self._hold.release()  # from here the pieces only wait for the upstream write
        if scan.status is ScanStatus.UNREADABLE and self._must_read:
            return UNREADABLE
        return rewrite_pieces(self.pieces, scan, self._model_map)

    def release(self) -> None:
        self._hold.release()
