"""Repository polling (--poll-s): files copied in by other means are validated, then served."""
from __future__ import annotations

import json
import os
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from broker.client import Client
from broker.errors import BadInput, ModelNotFound, ModelNotReady
from broker.settings import load
from fractal.serve import ServeSettings, _children

from .harness import Served, start_frontend, wait_for, wait_workers
from .onnx_models import constant_model

pytestmark = pytest.mark.slow  # starts real processes

POLL_S = 0.2
A, B = constant_model(1.0), constant_model(2.0)
NAME = "flip.onnx"
WORKERS = 2


def _values(client: Client, name: str = NAME) -> set:
    """What every worker answers for `name` now (two calls in one go: one per worker)."""
    seen = set()
    for outcome in client.call_many([("predict", {"model": name, "inputs": {"x": np.zeros((1, 1), np.float32)}})]
                                    * WORKERS, return_exceptions=True):
        seen.add(type(outcome).__name__ if isinstance(outcome, Exception) else float(outcome["outputs"]["y"][0, 0]))
    return seen


def _index(client: Client) -> dict:
    return {m["name"]: (m["state"], m["reason"]) for m in client.repository()}


def _index_everywhere(client: Client) -> dict:
    """The index as every worker answers it, checked to be the same: twice WORKERS calls, WORKERS at a
    time (a model-less call goes to an idle worker, so each of a batch goes to another one). With the
    broker's placement a worker never loads what another holds: the answer must not depend on it."""
    answers = [{m["name"]: (m["state"], m["reason"]) for m in outcome["models"]}
               for _ in range(2) for outcome in client.call_many([("repository", {})] * WORKERS)]
    assert all(a == answers[0] for a in answers), answers
    return answers[0]


def _atomic_copy(path: Path, data: bytes) -> None:
    tmp = path.parent / f".{path.name}.part"
    tmp.write_bytes(data)
    os.replace(tmp, path)


@pytest.fixture
def polled(procs, broker_url, tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    _atomic_copy(pool / NAME, A)
    workers = [procs.worker(broker_url, pool, "--poll-s", str(POLL_S)) for _ in range(WORKERS)]
    wait_workers(broker_url, WORKERS)
    with Client(broker_url, timeout_s=10) as client:
        wait_for(lambda: _values(client) == {1.0}, 30, "both workers to serve the copied-in model")
        yield {"pool": pool, "client": client, "workers": workers, "url": broker_url}


def _log(polled) -> str:
    return "".join(Path(w.log_path).read_text(errors="replace") for w in polled["workers"])


def test_a_slow_copy_is_never_served_half_written(polled):
    """Bytes appended in chunks: the old version answers throughout; the new one once it is whole."""
    client, path = polled["client"], polled["pool"] / NAME
    half, written, seen, go_on = len(B) // 2, threading.Event(), [], threading.Event()

    def writer():
        with open(path, "wb") as f:  # in place: same inode, the file shrinks to 0 and grows again
            for i in range(0, len(B), 16):
                if i >= half and not go_on.is_set():
                    go_on.wait(60)  # NOTE: paused mid-file until the pollers judged the half file
                f.write(B[i:i + 16])
                f.flush()
                time.sleep(POLL_S / 8)
        written.set()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        # the half file stays put long enough to be "stable": ONNX Runtime refuses it, the old model answers
        wait_for(lambda: "failed to load" in _index(client)[NAME][1], 30, "the half file to be judged")
        assert _index_everywhere(client)[NAME][0] == "READY"
        assert "serving the previous version" in _index_everywhere(client)[NAME][1]
        go_on.set()
        while not written.is_set():
            seen.extend(_values(client))
        assert set(seen) == {1.0}, seen
    finally:
        go_on.set()
        thread.join(60)
    wait_for(lambda: _values(client) == {2.0}, 30, "the whole new file to be served")
    assert _index_everywhere(client)[NAME] == ("READY", "")
    assert _log(polled).count(f"new file for {NAME} not served") >= 1


def test_an_atomic_copy_is_served_within_a_few_polls(polled):
    client, pool = polled["client"], polled["pool"]
    _atomic_copy(pool / NAME, B)
    _atomic_copy(pool / "new.onnx", B)
    started = time.monotonic()
    wait_for(lambda: _values(client) == {2.0} and _values(client, "new.onnx") == {2.0}, 30,
             "the copied files to be served")
    waited = time.monotonic() - started
    assert _index_everywhere(client)["new.onnx"] == ("READY", "")
    # NOTE: served only once two scans, POLL_S apart, saw the same file; the upper bound is
    # wait_for's (150 intervals), wide because a loaded machine stretches every interval.
    assert waited >= POLL_S
    assert "poll: serving the new file for new.onnx" in _log(polled)


def test_a_corrupt_file_never_breaks_the_running_model(polled, procs):
    client, pool = polled["client"], polled["pool"]
    base = start_frontend(procs, polled["url"])
    _atomic_copy(pool / NAME, b"this is not an onnx model" * 10)
    _atomic_copy(pool / "broken.onnx", b"\x08\x07 nor is this")
    # the first worker to judge a file records why it failed in the pool: the others read it and load
    # it no more, but each logs it once
    wait_for(lambda: _log(polled).count(f"new file for {NAME} not served") == WORKERS and
             _log(polled).count("new file for broken.onnx not served") == WORKERS, 30,
             "the corrupt files to be judged by both workers")
    index = _index_everywhere(client)
    assert index[NAME][0] == "READY" and "serving the previous version" in index[NAME][1]
    assert index["broken.onnx"][0] == "UNAVAILABLE" and "failed to load" in index["broken.onnx"][1]
    assert _values(client) == {1.0}  # the old session answers although the file under it is garbage
    assert _values(client, "broken.onnx") == {"ModelNotReady"}
    with pytest.raises(ModelNotReady, match="failed to load"):
        client.predict("broken.onnx", {"x": np.zeros((1, 1), np.float32)})
    with urllib.request.urlopen(urllib.request.Request(base + "/v2/repository/index", data=b"{}",
                                                       method="POST"), timeout=10) as resp:
        index = {m["name"]: m for m in json.loads(resp.read())}
    assert index[NAME]["state"] == "READY" and "serving the previous version" in index[NAME]["reason"]
    assert index["broken.onnx"]["state"] == "UNAVAILABLE" and "failed to load" in index["broken.onnx"]["reason"]
    # more scans go by (a later file gets served): each bad version was logged once per worker, not per scan
    _atomic_copy(pool / "later.onnx", A)
    wait_for(lambda: _values(client, "later.onnx") == {1.0}, 30, "a later file to be served")
    assert _log(polled).count(f"new file for {NAME} not served") == WORKERS
    assert _log(polled).count("new file for broken.onnx not served") == WORKERS
    # a good file over the corrupt one is served
    _atomic_copy(pool / "broken.onnx", B)
    wait_for(lambda: _values(client, "broken.onnx") == {2.0}, 30, "the repaired file to be served")
    assert _index_everywhere(client)["broken.onnx"] == ("READY", "")


def test_a_removed_file_stops_being_served(polled):
    client, pool = polled["client"], polled["pool"]
    os.remove(pool / NAME)
    assert _values(client) == {"ModelNotFound"}
    assert NAME not in _index_everywhere(client)
    # copied in again: a new file, judged again (the removed one's record is forgotten, not reused)
    wait_for(lambda: not (pool / ".validated" / NAME).exists(), 30, "the removed file's record to go")
    _atomic_copy(pool / NAME, b"garbage" * 20)
    wait_for(lambda: "failed to load" in _index(client)[NAME][1], 30, "the new file to be judged")
    assert _index_everywhere(client)[NAME][0] == "UNAVAILABLE"


def test_api_uploads_and_deletes_take_effect_at_once(polled):
    """The API validates before its rename: every polling worker serves the upload as soon as it returns."""
    client = polled["client"]
    for _ in range(5):
        client.upload(NAME, B)
        assert _values(client) == {2.0}
        client.upload(NAME, A)
        assert _values(client) == {1.0}
    client.delete(NAME)
    assert _values(client) == {"ModelNotFound"}
    with pytest.raises(ModelNotFound):
        client.predict(NAME, {"x": np.zeros((1, 1), np.float32)})


def test_explicit_mode_serves_a_copied_file_at_the_next_request(cluster, client):
    """Poll off (the default): no scan, and the per-request check serves the new file at once."""
    pool = cluster.model_dir
    _atomic_copy(pool / NAME, A)
    assert _values(client) == {1.0}
    _atomic_copy(pool / NAME, B)
    assert _values(client) == {2.0}
    os.remove(pool / NAME)
    assert _values(client) == {"ModelNotFound"}


def test_explicit_mode_index_tells_a_file_that_failed_to_load_on_every_worker(cluster, client):
    """Poll off: a file is judged when a request first loads it; the worker that finds it corrupt
    records why in the pool, so the index says so whichever worker answers, holder or not."""
    _atomic_copy(cluster.model_dir / NAME, b"this is not an onnx model" * 10)
    assert _index_everywhere(client)[NAME] == ("READY", "")  # not judged yet: no request loaded it
    with pytest.raises(BadInput, match="not a model ONNX Runtime can load"):
        client.predict(NAME, {"x": np.zeros((1, 1), np.float32)})
    state, reason = _index_everywhere(client)[NAME]
    assert state == "UNAVAILABLE" and "failed to load" in reason
    _atomic_copy(cluster.model_dir / NAME, A)  # a new file: judged afresh
    assert _values(client) == {1.0}
    assert _index_everywhere(client)[NAME] == ("READY", "")


def test_poll_s_is_a_setting_fractal_serve_passes_on():
    settings = load(ServeSettings, "serve", {"poll_s": "0.5", "model_dir": "/tmp/pool"})
    workers = [c for c in _children(settings) if c.name.startswith("worker-")]
    assert workers and all(c.argv[c.argv.index("--poll-s") + 1] == "0.5" for c in workers)
    with pytest.raises(Exception, match="poll_s"):
        load(ServeSettings, "serve", {"poll_s": "-1"})


def test_a_negative_poll_s_stops_the_worker_with_a_clear_error(procs, broker_url, tmp_path):
    proc = procs.worker(broker_url, tmp_path, "--poll-s", "-1")
    assert proc.wait(timeout=60) != 0
    assert "poll_s" in Path(proc.log_path).read_text()


def test_fractal_serve_polls_and_both_oip_clients_see_the_states(tmp_path):
    """`fractal serve --poll-s`: the index over REST and gRPC (tritonclient) tells the states; infer goes on."""
    import tritonclient.grpc as tg
    import tritonclient.http as th

    served = Served(tmp_path, None, "--poll-s", str(POLL_S))
    rest, grpc_client = th.InferenceServerClient(f"127.0.0.1:{served.http_port}"), tg.InferenceServerClient(
        served.grpc_target)
    try:
        x = np.zeros((1, 1), np.float32)

        def infer(name: str) -> float:
            given = th.InferInput("x", [1, 1], "FP32")
            given.set_data_from_numpy(x)
            return float(rest.infer(name, [given]).as_numpy("y")[0, 0])

        def grpc_index() -> dict:
            return {m["name"]: m for m in grpc_client.get_model_repository_index(as_json=True)["models"]}

        def served_by_both() -> bool:
            try:
                return [infer(NAME) for _ in range(2)] == [1.0, 1.0]
            except th.InferenceServerException as exc:
                assert "not ready" in str(exc)  # NOTE: a worker whose scans have not validated it yet
                return False

        _atomic_copy(served.pool / NAME, A)
        wait_for(served_by_both, 30, "the copied model to be served")
        _atomic_copy(served.pool / NAME, b"garbage" * 20)
        wait_for(lambda: "failed to load" in grpc_index()[NAME].get("reason", ""), 30, "the corrupt file's state")
        assert grpc_index()[NAME]["state"] == "READY"
        assert {m["name"]: m for m in rest.get_model_repository_index()}[NAME]["state"] == "READY"
        assert [infer(NAME) for _ in range(4)] == [1.0] * 4
        given = tg.InferInput("x", [1, 1], "FP32")
        given.set_data_from_numpy(x)
        assert float(grpc_client.infer(NAME, [given]).as_numpy("y")[0, 0]) == 1.0
        os.remove(served.pool / NAME)
        with pytest.raises(th.InferenceServerException, match="not found"):
            infer(NAME)
    finally:
        rest.close()
        grpc_client.close()
        assert served.stop() == 0
