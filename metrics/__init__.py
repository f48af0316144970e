"""Prometheus metric definitions and exporters for every component (issue 6 fills this in)."""

__all__: list[str] = []
