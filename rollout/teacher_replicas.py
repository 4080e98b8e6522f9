"""Which teacher replica gets the next request (`teacher.url` given as a list).

Pure logic: no I/O, the caller passes the clock. The only caller is
`TeacherClient._request` (rollout/teacher_client.py), on the client's event-loop
thread, so nothing here takes a lock. Unit-tested in
tests/unit/test_teacher_replicas.py; the run that survives a replica being
SIGKILLed is tests/e2e/test_reliability.py.

Rules:
  * A request goes to the replica in rotation with the fewest outstanding
    tokens (the tokens of its requests in flight). Ties go to the one sent the
    fewest requests so far, so one request at a time alternates.
  * A replica whose request fails with a connection error, a timeout, 429 or
    503 leaves the rotation. After its n-th failure in a row it stays out
    `replica_backoff_s(n)` seconds (base * 2**(n-1), capped, and at least the
    server's Retry-After). Then it is due for a probe: the next request it
    wins goes there, one at a time. A reply of any kind puts it back; a
    failure doubles its wait. Requests that were already in flight when it
    left count as failures in its metrics but do not lengthen the wait (a
    killed server fails all of them at once).
  * Any other reply (200, 400, 413, 500, ...) means the replica is up: the
    request was answered, right or wrong.
  * When every replica is out and none is due, `available` is False: the
    caller waits its own backoff, then `acquire` sends to the replica due back
    first. With one replica this is exactly the client's single-url
    behaviour.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence


def replica_backoff_s(failures_in_row: int, base_s: float, max_s: float, retry_after_s: float | None = None
                      ) -> float:
    """Seconds a replica stays out of rotation after its `failures_in_row`-th
    failure in a row (1-based): base_s * 2**(n-1) up to max_s, never less
    than the server's Retry-After. No jitter: other replicas carry the load
    meanwhile, so nothing is gained by spreading the probes."""
    wait = min(max_s, base_s * 2.0 ** max(0, failures_in_row - 1))
    return max(wait, retry_after_s or 0.0)


@dataclasses.dataclass
class Replica:
    """One teacher server and what the client knows about it."""

    url: str
    outstanding_tokens: int = 0  # tokens of its requests in flight now
    requests: int = 0  # requests sent to it
    tokens: int = 0  # tokens of the requests it answered with 200
    failures: int = 0  # requests that failed on it (connection, timeout, 429, 503)
    healthy: bool = True  # in rotation
    failures_in_row: int = 0  # failures since it was last in rotation (sets its wait)
    back_at: float = 0.0  # when out: the monotonic time its probe may go
    probing: bool = False  # a probe is in flight (one at a time)


@dataclasses.dataclass(frozen=True)
class Ticket:
    """One request sent to replica `index`; `probe`: sent while it was out."""

    index: int
    cost: int
    probe: bool


class ReplicaSet:
    """The replicas of one client: choose one per request, track their health.

    Per request: `t = acquire(cost, now)`, send to `replicas[t.index].url`,
    then `release(t)` (always, also when the send is cancelled) and one of
    `answered(t, ok)` / `failed(t, now, retry_after_s)`."""

    def __init__(self, urls: Sequence[str], backoff_base_s: float, backoff_max_s: float):
        if not urls:
            raise ValueError("no teacher replica url")
        self.replicas = [Replica(u) for u in urls]
        self.backoff_base_s, self.backoff_max_s = backoff_base_s, backoff_max_s

    def __len__(self) -> int:
        return len(self.replicas)

    def _due(self, r: Replica, now: float) -> bool:
        return r.healthy or (not r.probing and now >= r.back_at)

    def available(self, now: float) -> bool:
        """Whether some replica is in rotation or due for its probe."""
        return any(self._due(r, now) for r in self.replicas)

    def choose(self, now: float) -> int:
        """Index of the replica the next request goes to (see the module docstring)."""
        due = [i for i, r in enumerate(self.replicas) if self._due(r, now)]
        if not due:  # every one is out: the one due back first (ties: fewest in flight)
            return min(range(len(self.replicas)),
                       key=lambda i: (self.replicas[i].back_at, self.replicas[i].outstanding_tokens, i))
        return min(due, key=lambda i: (self.replicas[i].outstanding_tokens, self.replicas[i].requests, i))

    def acquire(self, cost: int, now: float) -> Ticket:
        i = self.choose(now)
        r = self.replicas[i]
        probe = not r.healthy
        r.probing = r.probing or probe
        r.outstanding_tokens += cost
        r.requests += 1
        return Ticket(i, cost, probe)

    def release(self, t: Ticket) -> None:
        r = self.replicas[t.index]
        r.outstanding_tokens -= t.cost
        if t.probe:
            r.probing = False

    def answered(self, t: Ticket, ok: bool) -> None:
        """The replica replied (`ok`: with 200). A probe's reply puts it back in rotation."""
        r = self.replicas[t.index]
        if ok:
            r.tokens += t.cost
        if t.probe and not r.healthy:
            r.healthy, r.failures_in_row, r.back_at = True, 0, 0.0

    def failed(self, t: Ticket, now: float, retry_after_s: float | None = None) -> bool:
        """The request failed on the replica: take it out (or keep it out
        longer). True when this took it out of rotation."""
        r = self.replicas[t.index]
        r.failures += 1
        was_healthy = r.healthy
        if r.healthy or t.probe:
            r.healthy = False
            r.failures_in_row += 1
            r.back_at = now + replica_backoff_s(r.failures_in_row, self.backoff_base_s, self.backoff_max_s,
                                                retry_after_s)
        elif retry_after_s is not None:  # in flight before it left: only a longer Retry-After counts
            r.back_at = max(r.back_at, now + retry_after_s)
        return was_healthy

    def metrics(self) -> dict[str, float]:
        """Cumulative `teacher/replica<i>/{requests,tokens,failures,healthy}`."""
        out: dict[str, float] = {}
        for i, r in enumerate(self.replicas):
            out.update({f"teacher/replica{i}/requests": r.requests, f"teacher/replica{i}/tokens": r.tokens,
                        f"teacher/replica{i}/failures": r.failures, f"teacher/replica{i}/healthy": int(r.healthy)})
        return out
