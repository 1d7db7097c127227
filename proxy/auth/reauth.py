"""One retry with a fresh token when the upstream answers 401.

A 401 from Cloud Run means the token was refused (expired in flight, revoked,
rotated keys): a new token usually fixes it. The retry happens only where it
is safe and useful:

- in ``authorization`` mode only: in ``x-serverless-authorization`` mode Cloud
  Run checks the token itself and answers 403, so a 401 is the app's own answer;
- never on 403 (a permission problem a new token does not fix);
- only when the request can be sent again as it was: no body, or a body of at
  most ``REPLAY_MAX_BYTES`` with a Content-Length, which the handler reads
  before sending (``should_buffer``); streamed and chunked bodies are not retried;
- only before anything was sent to the client (the 401's headers are held back);
- with the cache's rate limit: at most one forced refresh per key per minute,
  and none while the current token is less than a minute old.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from multidict import CIMultiDict

from .tokens import TokenCache, TokenKey

log = logging.getLogger(__name__)

#: Bodies up to this size (with a known Content-Length) are buffered so a 401 can be retried.
REPLAY_MAX_BYTES = 64 * 1024
AUTHORIZATION_MODE = "authorization"


class Response(Protocol):
    """What the retry needs of an upstream response (aiohttp's, or the lean client's)."""

    status: int

    def release(self) -> Any: ...


R = TypeVar("R", bound=Response)


def should_buffer(header_mode: str, content_length: int | None) -> bool:
    """Whether the handler should read the request body before sending it upstream."""
    return header_mode == AUTHORIZATION_MODE and content_length is not None and content_length <= REPLAY_MAX_BYTES


def replayable(body: object) -> bool:
    """A body that can be sent a second time: none, or bytes already in hand."""
    return body is None or isinstance(body, (bytes, bytearray))


async def retry_on_401(
    tokens: TokenCache,
    key: TokenKey,
    header_mode: str,
    body: object,
    sent_token: str,
    response: R,
    resend: Callable[[str], Awaitable[R]],
) -> R:
    """The response to relay: ``response`` itself, or that of one retry with a fresh token.

    ``resend(token)`` sends the same request again with ``token``; its failures
    propagate like those of the first attempt.
    """
    if response.status != 401 or header_mode != AUTHORIZATION_MODE or not replayable(body):
        return response
    fresh = await tokens.force_refresh(key, sent_token)
    if fresh is None:
        return response
    # Nothing of the 401 reached the client: drop it and ask again.
    response.release()
    log.info("upstream answered 401 for %s: retrying once with a new token", key.audience)
    return await resend(fresh)


def with_token(headers: CIMultiDict[str], header_mode: str, token: str) -> CIMultiDict[str]:
    """A copy of upstream request ``headers`` carrying ``token`` instead of the refused one."""
    out = headers.copy()
    out[header_mode] = f"Bearer {token}"
    return out
