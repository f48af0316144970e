"""How the AsyncClient sends each model's calls: one per message, in packs, or in packs behind a window.

The client learns each model's run time from its replies (`timing.inference_ms`) and sorts models in
three kinds, with hysteresis so that one odd run does not flip a model back and forth:

- **solo** (a run of SOLO_ABOVE_MS or more): one call per message. A pack goes to one worker, so it
  would keep a slow model's other replicas idle, while what a pack saves (~50 µs of messaging per
  call) is nothing beside such a run. Back to packs under half of it.
- **tiny** (a run under WINDOW_BELOW_MS): packed, and at most PACK_WINDOW messages of the model are in
  flight at once; calls made meanwhile wait in the outbox and leave together when one comes back.
  For such a model the messaging costs more than the run (the broker's and worker's work per message
  is some 20-60 µs, the run a few), so under steady load it is cheaper to send fewer, larger packs
  than to send each loop turn's one or two calls at once. Without a timer: a call that finds fewer
  than PACK_WINDOW messages of its model in flight leaves at once, so a lone caller never waits.
  Leaves the kind at twice the bound.
- anything else, and a model not timed yet: packed, each loop turn's calls leave at once.
"""
from __future__ import annotations

from typing import Any

SOLO_ABOVE_MS = 1.0
WINDOW_BELOW_MS = 0.1
# Two, not one: while one pack's reply travels back, the next is already with a worker, so the
# broker and worker never wait for the client; more only splits the calls into smaller packs again.
PACK_WINDOW = 2


class Pacing:
    """One client's per-model kinds and its tiny models' messages in flight. Not thread-safe: the
    AsyncClient uses it from its event loop only."""

    def __init__(self) -> None:
        self.solo: set[Any] = set()
        self.tiny: set[Any] = set()
        self._flying: dict[int, tuple[Any, float]] = {}  # message id -> (tiny model, its latest deadline)
        self._count: dict[Any, int] = {}  # tiny model -> its messages in flight

    def learn(self, model: Any, ran_ms: float) -> None:
        """One reply of `model` said its run took `ran_ms`."""
        if ran_ms >= SOLO_ABOVE_MS:
            self.solo.add(model)
            self.tiny.discard(model)
            return
        if ran_ms < SOLO_ABOVE_MS / 2 and self.solo:
            self.solo.discard(model)
        if ran_ms < WINDOW_BELOW_MS:
            self.tiny.add(model)
        elif ran_ms >= 2 * WINDOW_BELOW_MS and self.tiny:
            self.tiny.discard(model)

    def held(self, model: Any) -> bool:
        """Must `model`'s calls wait for one of its messages in flight to come back?"""
        return self._count.get(model, 0) >= PACK_WINDOW and model in self.tiny

    def sent(self, model: Any, message_id: int, deadline: float) -> None:
        """A message of `model` left; its reply will carry `message_id` (the pack's id or the lone
        call's). Only a tiny model's messages are counted."""
        if model in self.tiny:
            self._flying[message_id] = (model, deadline)
            self._count[model] = self._count.get(model, 0) + 1

    def answered(self, message_id: int) -> bool:
        """A reply carrying `message_id` came; True when that freed a place in a window."""
        entry = self._flying.pop(message_id, None)
        if entry is None:
            return False
        self._release(entry[0])
        return True

    def expire(self, now: float) -> bool:
        """Forget the messages whose every call is past its deadline (their reply is lost or late, and
        the calls have failed with Timeout): a lost reply must not close a window for good. True when
        that freed a place."""
        gone = [message_id for message_id, (_model, deadline) in self._flying.items() if deadline <= now]
        for message_id in gone:
            self._release(self._flying.pop(message_id)[0])
        return bool(gone)

    def clear(self) -> None:
        """The connection dropped: nothing in flight will be answered."""
        self._flying.clear()
        self._count.clear()

    def _release(self, model: Any) -> None:
        left = self._count[model] - 1
        if left:
            self._count[model] = left
        else:
            del self._count[model]
