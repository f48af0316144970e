"""`python -m broker` / `fractal broker`: run the MDP/0.2 broker."""
from __future__ import annotations

import sys
from typing import Sequence

from .broker import Broker, BrokerSettings
from .runner import run_component


def main(argv: Sequence[str] | None = None) -> int:
    return run_component("broker", "Majordomo (MDP/0.2) broker between clients and workers.",
                         BrokerSettings, Broker, argv)


if __name__ == "__main__":
    sys.exit(main())
