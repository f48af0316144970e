"""A job: one decoded request on its way through the worker, whichever way it runs (alone, as a pack
member, or as a row of a dynamic batch), answered through ModelHost.answer.

It is made once, when the request is decoded, and carries what every later step needs (where to
reply, its deadline, its times) and what they learned (its outcome, its run), so nothing reads the
request map's bookkeeping fields twice.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .connection import Connection
    from .inference import Run


@dataclass(slots=True, eq=False)
class Job:
    client: bytes          # the client's address frame: where its FINAL goes (a pack member: its pack's)
    rid: Any               # the request's id, echoed in its reply
    op: str | None         # None: the request is not a map with a string op (answered ProtocolError)
    model: Any             # the request's `model` as sent (None for ops without one)
    version: Any           # the request's `version` as sent (None: the newest)
    fields: dict           # the decoded request map ({} when it is not a map)
    expires_at: float      # monotonic: the caller's deadline (protocol.deadline_of); inf: none
    trace: Any             # the caller's request_id, for logs
    received: float        # monotonic: where its deadline_ms counts from
    arrived: float         # perf_counter: where its worker_ms counts from, batched or not
    conn: Connection | None = None  # the connection it came on (None: a pack member, answered in its pack)
    generation: int = 0    # conn's generation then: a batch row's late reply to a replaced socket is dropped
    in_pack: bool = False  # its outcome goes into its pack's one reply (worker/packs.py)
    batched: bool = False  # it joined a batch (logged; a dynamic batch's rows are sent after the run)
    # Learned on the way, for the bookkeeping done once the reply has left:
    outcome: Any = None    # its result map, or the FractalError it is answered with
    elapsed_s: float = 0.0  # from `arrived` to its encoded reply
    ran: Run | None = None  # the InferenceSession.run it took part in (None: it ran none)
    dropped: bool = False  # answered Timeout without running: its deadline could not be met

    @classmethod
    def of(cls, request: Any, client: bytes, received: float, arrived: float, expires_at: float,
           conn: Connection | None = None) -> Job:
        """The job of one decoded request (any value for a pack member, which may be no map at all)."""
        fields = request if isinstance(request, dict) else {}
        op = fields.get("op")
        return cls(client, fields.get("id"), op if isinstance(op, str) else None, fields.get("model"),
                   fields.get("version"), fields, expires_at, fields.get("request_id"), received, arrived, conn,
                   conn.generation if conn is not None else 0)
