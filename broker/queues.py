"""A service's waiting requests: one bounded queue per model, taken round-robin between models.

A flood of requests for one model fills that model's queue, not the service's: each time a worker
becomes free it takes the oldest request of the next model in turn, so a model with one request
waiting is served after at most one request of every other model with waiting work, however long
their queues are. The model is read from the routing header without decoding the body
(protocol.route_of); requests without one share the model b"".
"""
from __future__ import annotations

from collections import deque
from typing import Callable, Generic, Protocol, TypeVar


class Queued(Protocol):
    """What the queue reads of a request: its model, the user requests it carries, its expiry."""
    model: bytes
    count: int
    expires_at: float


R = TypeVar("R", bound=Queued)


class ModelQueue(Generic[R]):
    """One model's waiting messages, oldest first, and the user requests they carry."""
    __slots__ = ("requests", "queued")

    def __init__(self) -> None:
        self.requests: deque[R] = deque()
        self.queued = 0


class FairQueue(Generic[R]):
    """Per-model FIFO queues served round-robin. `len()` counts messages (a pack is one), `queued`
    user requests (a pack counts its n). Bounds are the caller's: see `queued_for`."""

    def __init__(self) -> None:
        self._models: dict[bytes, ModelQueue[R]] = {}  # only models with waiting messages
        self._turn: deque[bytes] = deque()               # those models, the next one to serve first
        self._messages = 0
        self.queued = 0

    def __len__(self) -> int:
        return self._messages

    def __bool__(self) -> bool:
        return self._messages > 0

    def queued_for(self, model: bytes) -> int:
        """User requests waiting for `model`."""
        found = self._models.get(model)
        return found.queued if found is not None else 0

    def others_waiting(self, model: bytes) -> bool:
        """Whether a named model (not `""`) other than `model` has messages waiting; O(1)."""
        models = self._models
        if len(models) > 2:  # NOTE: at most one of them is `model` and one is ""
            return True
        return any(name and name != model for name in models)

    def oldest(self, model: bytes) -> R | None:
        """The request that has waited longest for `model` (a re-dispatch counts as oldest), or None."""
        found = self._models.get(model)
        return found.requests[0] if found is not None else None

    def models(self) -> dict[bytes, int]:
        """User requests waiting, by model (for status pages)."""
        return {name: q.queued for name, q in self._models.items()}

    def push(self, request: R, first: bool = False) -> None:
        """Queue `request` behind its model's others, or (`first`: a re-dispatch) ahead of everything."""
        queue = self._models.get(request.model)
        if queue is None:
            queue = self._models[request.model] = ModelQueue()
            (self._turn.appendleft if first else self._turn.append)(request.model)
        elif first:  # NOTE: a request whose worker died has waited already: its model goes next
            self._turn.remove(request.model)
            self._turn.appendleft(request.model)
        (queue.requests.appendleft if first else queue.requests.append)(request)
        queue.queued += request.count
        self._messages += 1
        self.queued += request.count

    def pop(self) -> R:
        """The oldest request of the next model in turn; that model then goes to the back of the turn.
        Raises IndexError when empty."""
        model = self._turn.popleft()
        queue = self._models[model]
        request = queue.requests.popleft()
        queue.queued -= request.count
        if queue.requests:
            self._turn.append(model)
        else:
            del self._models[model]
        self._messages -= 1
        self.queued -= request.count
        return request

    def pop_eligible(self, eligible: Callable[[bytes], bool]) -> R | None:
        """As pop, for the first model in turn that `eligible` accepts (a model it refuses goes to the
        back of the turn); None when it accepts none."""
        turn = self._turn
        for _ in range(len(turn)):
            if eligible(turn[0]):
                return self.pop()
            turn.rotate(-1)
        return None

    def expire(self, now: float) -> list[R]:
        """Remove and return every request whose `expires_at` is before `now` (deadlines differ within
        a model, so the whole queue is looked at: O(waiting), called a few times a second)."""
        gone: list[R] = []
        for model in list(self._models):
            queue = self._models[model]
            if not any(r.expires_at < now for r in queue.requests):
                continue
            keep: deque[R] = deque()
            for request in queue.requests:
                (gone if request.expires_at < now else keep).append(request)
            queue.requests = keep
            queue.queued = sum(r.count for r in keep)
            if not keep:
                del self._models[model]
                self._turn.remove(model)
        self._messages -= len(gone)
        self.queued -= sum(r.count for r in gone)
        return gone
