"""The AsyncClient's pacing rules in process (broker/pacing.py): how a model's run time sorts it into
solo, packed or windowed, and that a window opens on a reply, on expiry and on a dropped connection."""
from __future__ import annotations

from broker.pacing import PACK_WINDOW, SOLO_ABOVE_MS, WINDOW_BELOW_MS, Pacing


def windowed(model: str = "iris") -> Pacing:
    pacing = Pacing()
    pacing.learn(model, WINDOW_BELOW_MS / 10)
    return pacing


def test_a_model_is_sorted_by_its_last_run_with_hysteresis():
    pacing = Pacing()
    pacing.learn("m", WINDOW_BELOW_MS / 2)
    assert "m" in pacing.tiny and "m" not in pacing.solo
    pacing.learn("m", WINDOW_BELOW_MS * 1.5)  # between the bounds: stays tiny
    assert "m" in pacing.tiny
    pacing.learn("m", WINDOW_BELOW_MS * 2)
    assert "m" not in pacing.tiny and "m" not in pacing.solo
    pacing.learn("m", SOLO_ABOVE_MS)
    assert "m" in pacing.solo and "m" not in pacing.tiny
    pacing.learn("m", SOLO_ABOVE_MS * 0.7)  # between the bounds: stays solo
    assert "m" in pacing.solo
    pacing.learn("m", SOLO_ABOVE_MS * 0.4)
    assert "m" not in pacing.solo and "m" not in pacing.tiny
    pacing.learn("m", WINDOW_BELOW_MS / 2)
    assert "m" in pacing.tiny


def test_a_tiny_models_calls_are_held_once_its_window_is_full():
    pacing = windowed()
    for message_id in range(PACK_WINDOW):
        assert not pacing.held("iris")
        pacing.sent("iris", message_id, deadline=10.0)
    assert pacing.held("iris")
    assert not pacing.held("other")  # windows are per model


def test_other_models_are_never_held():
    pacing = Pacing()
    pacing.learn("mid", WINDOW_BELOW_MS * 3)
    pacing.learn("slow", SOLO_ABOVE_MS * 5)
    for message_id in range(10):
        pacing.sent("mid", message_id, 10.0)
        pacing.sent("slow", 100 + message_id, 10.0)
        pacing.sent("untimed", 200 + message_id, 10.0)
    assert not pacing.held("mid") and not pacing.held("slow") and not pacing.held("untimed")
    assert not pacing.answered(3)  # not counted, so nothing to free


def test_a_reply_opens_the_window_once():
    pacing = windowed()
    for message_id in range(PACK_WINDOW):
        pacing.sent("iris", message_id, 10.0)
    assert pacing.answered(0)
    assert not pacing.held("iris")
    assert not pacing.answered(0)  # a duplicate reply frees nothing more
    pacing.sent("iris", 7, 10.0)
    assert pacing.held("iris")


def test_messages_past_their_deadline_stop_holding_the_window():
    """A lost reply must not close a model's window for good."""
    pacing = windowed()
    pacing.sent("iris", 1, deadline=5.0)
    pacing.sent("iris", 2, deadline=9.0)
    assert pacing.held("iris")
    assert not pacing.expire(now=4.9)
    assert pacing.held("iris")
    assert pacing.expire(now=5.0)
    assert not pacing.held("iris")
    assert pacing.answered(2) and not pacing.answered(1)


def test_a_dropped_connection_empties_every_window():
    pacing = windowed()
    for message_id in range(PACK_WINDOW):
        pacing.sent("iris", message_id, 10.0)
    pacing.clear()
    assert not pacing.held("iris") and not pacing.answered(0)
    assert "iris" in pacing.tiny  # what was learned stays


def test_a_batch_members_run_counts_as_its_share_of_the_run():
    """A dynamically batched reply's inference_ms is the whole run's; the client paces by its part."""
    from broker.client import AsyncClient
    client = AsyncClient("tcp://127.0.0.1:9")  # never opened: _learn needs no socket
    client._learn({"model": "m"}, {"timing": {"inference_ms": 0.5, "share": 1 / 64}})
    client._learn({"model": "alone"}, {"timing": {"inference_ms": 0.5}})
    assert "m" in client._pacing.tiny and "alone" not in client._pacing.tiny
    client._learn({"model": "m"}, {"timing": {"inference_ms": 64.0, "share": 1 / 64}})  # 1 ms each
    assert "m" in client._pacing.solo
