"""Fixtures: real brokers, workers and servers on free local ports, cleaned up after each test.

The helpers they use live in tests/harness.py; tests import from there, never from this file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from broker.client import Client

from .harness import (
    BUNDLED,
    HEARTBEAT,
    LIVENESS_WINDOW_S,
    REPO,
    Clock,
    Cluster,
    Processes,
    Served,
    busy_workers,
    copy_bundled_models,
    dealer,
    debian_tool,
    free_port,
    free_ports,
    nodes_answering,
    start_frontend,
    tcp_open,
    wait_busy,
    wait_for,
    wait_workers,
)

# NOTE: names tests imported from this file before tests/harness.py existed, kept so that a test
# written on another branch still runs after the merge; new tests import them from .harness.
__all__ = ["BUNDLED", "HEARTBEAT", "LIVENESS_WINDOW_S", "REPO", "Served", "busy_workers", "dealer", "debian_tool",
           "free_port", "free_ports", "nodes_answering", "start_frontend", "tcp_open", "wait_busy", "wait_for",
           "wait_workers"]


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    p = Processes(tmp_path)
    yield p
    p.stop_all()


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return copy_bundled_models(tmp_path / "models")


@pytest.fixture
def broker_url(procs: Processes) -> str:
    url = f"tcp://127.0.0.1:{free_port()}"
    procs.broker(url)
    return url


@pytest.fixture
def cluster(procs: Processes, broker_url: str, model_dir: Path) -> Cluster:
    """A broker and two workers over a copy of the bundled models."""
    workers = [procs.worker(broker_url, model_dir) for _ in range(2)]
    wait_workers(broker_url, 2)
    return Cluster(broker_url, workers, model_dir)


@pytest.fixture
def client(cluster: Cluster) -> Iterator[Client]:
    with Client(cluster.url, timeout_s=10) as c:
        yield c


PROCESS_FIXTURES = {"procs", "broker_url", "cluster", "client"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that uses a process fixture is slow even where its module forgot to say so."""
    for item in items:
        if PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """The broker module's clock, for in-process broker tests: it moves only when the test says so."""
    import broker.broker as broker_module
    c = Clock()
    monkeypatch.setattr(broker_module, "time", c)
    return c
