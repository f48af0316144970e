"""Where to connect, on this host, to reach a server bound to a host or endpoint."""
from __future__ import annotations

WILDCARDS = frozenset({"0.0.0.0", "*", ""})  # bind to every address; not an address to connect to


def connect_host(host: str) -> str:
    """`host` as an address to connect to: a wildcard bind (0.0.0.0, *, empty) answers on 127.0.0.1."""
    return "127.0.0.1" if host in WILDCARDS else host


def connect_endpoint(endpoint: str) -> str:
    """A ZeroMQ bind endpoint (tcp://0.0.0.0:5555, tcp://*:5555) as one to connect to on this host."""
    scheme, sep, rest = endpoint.partition("://")
    host, colon, port = rest.rpartition(":")
    if not (sep and colon):
        return endpoint  # inproc://, ipc:// and the like name no host
    return f"{scheme}://{connect_host(host)}:{port}"
