"""The upstream conversation for one client request, as a generator flow.

The flow yields each `UpstreamRequest` to send and is sent back the
`UpstreamHead` that answered it; it returns the head whose body goes to the
client. The shell (`vpsrelay.upstream.client.Upstream.open`) does the IO, so the decisions
here are tested by feeding heads in by hand.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass

from vpsrelay.core import headers as header_policy
from vpsrelay.core.redirects import REDIRECT_STATUSES, RedirectPolicy, UpstreamRequest, next_hop


@dataclass(frozen=True, slots=True)
class UpstreamHead:
    """Status and headers of one upstream answer (its body stays in the shell)."""

    status: int
    headers: header_policy.Headers
    url: str


Flow = Generator[UpstreamRequest, UpstreamHead, UpstreamHead]


def pull_flow(first: UpstreamRequest, policy: RedirectPolicy, *, follow: bool = True) -> Flow:
    """Send `first`; follow redirects (when `follow`) up to the policy's limit.

    Raises:
        TooManyRedirects, RedirectRefused: from `next_hop`.
    """
    request = first
    hops = 0
    while True:
        head = yield request
        if not follow or head.status not in REDIRECT_STATUSES:
            return head
        request = next_hop(request, header_policy.get(head.headers, "location"), hops, policy)
        hops += 1
