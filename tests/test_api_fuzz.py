"""The HTTP API fuzzed from its own /openapi.json with schemathesis: no request may cause a 5xx."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .harness import Served

pytestmark = pytest.mark.slow  # starts real processes


def test_no_generated_request_causes_a_server_error(tmp_path):
    served = Served(tmp_path)
    try:
        cli = shutil.which("schemathesis") or str(Path(sys.executable).parent / "schemathesis")
        # Seeded, so a failure replays; bounded, so the suite stays fast (bench: --max-examples 80).
        result = subprocess.run([cli, "run", f"{served.base}/openapi.json", "--checks", "not_a_server_error",
                                 "--max-examples", "10", "--seed", "1"], capture_output=True, text=True, timeout=300,
                                cwd=tmp_path)  # NOTE: schemathesis writes a cache where it runs
        assert result.returncode == 0, result.stdout[-3000:]
        assert "passed" in result.stdout
        assert "Traceback" not in served.log()
    finally:
        assert served.stop() == 0
