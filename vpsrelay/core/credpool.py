"""Which of the operator's credentials for a registry the next pull uses.

Docker Hub counts pulls per account (100 per 6 h for a free one). With several accounts
in the pool, the relay spreads pulls over them in turn, and a credential that answered
429, or `ratelimit-remaining: 0`, rests until its window has passed (the `Retry-After`
of the 429, else the `w=` the budget stated, else `DEFAULT_REST`). When every credential
rests, the one whose rest ends first is used: its 429 then reaches the client (or the
cache serves a stale copy), which costs no pull.

Times are the caller's monotonic clock, in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from vpsrelay.core.ratelimit import DEFAULT_RETRY_AFTER

if TYPE_CHECKING:
    from collections.abc import Collection, Sequence

    from vpsrelay.core.ratelimit import RateLimit

# A credential at `ratelimit-remaining: 0` whose answer named no window rests this long.
DEFAULT_REST = float(DEFAULT_RETRY_AFTER)


@dataclass(slots=True)
class CredentialState:
    """What the registry last said about one credential's budget."""

    name: str  # the username: shown to the operator, never the secret
    limit: int | None = None
    remaining: int | None = None
    window_seconds: int | None = None
    rest_until: float | None = None  # resting (skipped) until this time
    refusals: int = 0  # 429 answers so far

    def resting(self, now: float) -> bool:
        return self.rest_until is not None and now < self.rest_until


class CredentialPool:
    """The operator's credentials for one registry, chosen in turn, resting when spent."""

    def __init__(self, names: Sequence[str]) -> None:
        if not names:
            raise ValueError("a credential pool needs at least one credential")
        self.states = {name: CredentialState(name) for name in names}
        self._order = tuple(self.states)
        self._turn = 0

    def choose(self, now: float, avoid: Collection[str] = ()) -> str:
        """The credential for the next request: the next in turn that is not resting
        (and not in `avoid`, the ones this request already tried); when none is, the
        one whose rest ends first."""
        candidates = [name for name in self._order if name not in avoid] or list(self._order)
        ready = [name for name in candidates if not self.states[name].resting(now)]
        if ready:
            chosen = ready[self._turn % len(ready)]
            self._turn += 1
            return chosen
        return min(candidates, key=lambda name: self.states[name].rest_until or 0.0)

    def has_ready(self, now: float, avoid: Collection[str]) -> bool:
        """Whether a credential outside `avoid` is not resting (worth a retry)."""
        return any(
            not state.resting(now) for name, state in self.states.items() if name not in avoid
        )

    def answered(
        self,
        name: str,
        now: float,
        *,
        status: int,
        budget: RateLimit | None,
        retry_after: int | None,
    ) -> CredentialState | None:
        """Record the registry's answer to a request made with `name`; its state, or None
        for a name not in the pool.

        `retry_after`: the answer's `Retry-After` in seconds, if it had one.
        """
        state = self.states.get(name)
        if state is None:
            return None
        if budget is not None:
            state.limit = budget.limit if budget.limit is not None else state.limit
            state.remaining = budget.remaining
            state.window_seconds = budget.window_seconds or state.window_seconds
        if status == 429:
            state.refusals += 1
            state.remaining = 0
            rest = retry_after if retry_after is not None else state.window_seconds
            state.rest_until = now + float(rest if rest is not None else DEFAULT_REST)
        elif budget is not None and budget.remaining == 0:
            state.rest_until = now + float(state.window_seconds or DEFAULT_REST)
        elif 200 <= status < 400 and budget is not None and budget.remaining:
            state.rest_until = None  # the window passed early (a rolling window)
        return state
