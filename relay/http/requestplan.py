"""Sans-IO: what relay does with a request, decided from its head alone.

One pure function, :func:`plan_request`, with a table-driven test: how the
request's body is framed, whether the client asked to close, whether relay
answers it itself (the merged model list), and whether its body must be held
and read for its model (aliasing, pinning, routing) before it may go upstream.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .headers import has_token, is_json_or_untyped

__all__ = ["RequestPlan", "plan_request"]

_MODEL_LISTS = (b"/v1/models", b"/models")


@dataclass(slots=True)  # made once a request: plain slots, not a frozen __init__
class RequestPlan:
    expects_body: bool  # a body follows the head (a length above 0, or chunks)
    chunked: bool  # the client sends chunks (relay re-chunks them upstream)
    length: bytes | None  # the client's Content-Length, forwarded as it is
    client_closes: bool  # Connection: close
    lists_models: bool  # relay answers GET /v1/models itself
    inspect: bool  # the body is held and read for its model before it goes upstream
    must_read_model: bool  # ... and refused if relay cannot read the model
    route_by_body: bool  # the upstream is chosen by the body's model


#: Lengths of the names read: content-length, transfer-encoding, connection.
_READ_NAME_SIZES = frozenset((14, 17, 10))


def plan_request(
    method: bytes,
    path: bytes,
    fields: Sequence[tuple[bytes, bytes]],
    *,
    rewrites_models: bool,
    pins_model: bool,
    routes_by_model: bool,
    knows_more_models: bool,
) -> RequestPlan:
    """Decide, for a request head h11 accepted (``fields``: names in any case).

    ``rewrites_models``: aliases or ``--model`` are configured; ``pins_model``:
    ``--model``; ``routes_by_model``: ``--route``; ``knows_more_models``: relay
    knows names or upstreams one upstream's model list would miss (aliases,
    routes, several upstreams).

    Pinning and routing must know the model, so then every POST body is read
    (FastAPI reads some bodies as JSON whatever their Content-Type) and one
    relay cannot read is refused; aliases alone read JSON (or untyped) bodies.
    """
    expects_body = chunked = client_closes = False
    length: bytes | None = None
    for name, value in fields:
        size = len(name)  # the length first: most names are none of these
        if size not in _READ_NAME_SIZES:
            continue
        name = name.lower()
        if name == b"content-length":
            length = value
            expects_body = value != b"0"
        elif name == b"transfer-encoding":
            expects_body = chunked = True
        elif name == b"connection" and not client_closes:
            client_closes = has_token(((name, value),), name, b"close")
    must_read = pins_model or routes_by_model
    inspect = (
        (rewrites_models or routes_by_model)
        and method == b"POST"
        and expects_body
        and (must_read or is_json_or_untyped(fields))
    )
    return RequestPlan(
        expects_body=expects_body,
        chunked=chunked,
        length=length,
        client_closes=client_closes,
        lists_models=method == b"GET"
        and not expects_body
        and knows_more_models
        and path.split(b"?", 1)[0] in _MODEL_LISTS,
        inspect=inspect,
        must_read_model=must_read,
        route_by_body=inspect and routes_by_model,
    )
