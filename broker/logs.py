"""Logging set-up shared by every main(): one line per record, with component and pid."""
from __future__ import annotations

import logging


def setup_logging(component: str, level: str = "INFO") -> None:
    """Configure the root logger once, for a process's main() only."""
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s %(levelname)s {component}[%(process)d] %(name)s: %(message)s",
    )
