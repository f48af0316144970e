"""The `fractal` command: runs each component, or all of them on one machine with `fractal serve`."""

__all__: list[str] = []
