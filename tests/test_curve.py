"""ZeroMQ CURVE: a broker with an allow-list serves peers with known keys and refuses the others."""
from __future__ import annotations

import subprocess
import sys

import pytest

from broker.client import Client
from broker.curve import PeerKeys
from broker.errors import NoWorkerAvailable

from .harness import free_port, wait_for

pytestmark = pytest.mark.slow  # starts real processes


@pytest.fixture
def keys(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fractal", "keys", str(tmp_path / "keys"), "broker", "worker",
                          "client", "stranger"], capture_output=True, text=True, check=True).stdout
    assert "broker.key_secret" in out
    allow = tmp_path / "allowed"
    allow.mkdir()
    for name in ("worker", "client"):
        (allow / f"{name}.key").write_bytes((tmp_path / "keys" / f"{name}.key").read_bytes())
    return tmp_path / "keys", allow


def test_known_keys_are_served_and_unknown_ones_refused(procs, model_dir, keys):
    key_dir, allow = keys
    url = f"tcp://127.0.0.1:{free_port()}"
    procs.broker(url, "--curve-secret-key", str(key_dir / "broker.key_secret"), "--curve-allow-dir", str(allow))
    procs.worker(url, model_dir, "--curve-secret-key", str(key_dir / "worker.key_secret"),
                 "--curve-broker-key", str(key_dir / "broker.key"))
    known = PeerKeys.from_files(str(key_dir / "client.key_secret"), str(key_dir / "broker.key"))
    stranger = PeerKeys.from_files(str(key_dir / "stranger.key_secret"), str(key_dir / "broker.key"))
    with Client(url, timeout_s=5, curve=known) as client:
        wait_for(client.service_ready, 10, "the worker to register over CURVE")
        assert client.predict("iris.onnx", {"float_input": [[2, 5, 1, 4]]})["label"].tolist() == [1]
    for curve in (stranger, None):  # an unknown key, and no CURVE at all
        with Client(url, timeout_s=3, curve=curve) as client:
            with pytest.raises(NoWorkerAvailable, match="cannot reach the broker"):
                client.models()

    def cli(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "fractal", "predict", "--broker", url, "--timeout-s", "3",
                               *flags, "iris", "2", "5", "1", "4"], capture_output=True, text=True, timeout=30)
    out = cli("--curve-secret-key", str(key_dir / "client.key_secret"), "--curve-broker-key",
              str(key_dir / "broker.key"))
    assert out.returncode == 0 and '"label": [1]' in out.stdout, out.stderr
    out = cli()
    assert out.returncode == 1 and "--curve-secret-key and --curve-broker-key" in out.stderr


def test_half_a_curve_configuration_is_a_config_error(keys):
    from broker.errors import ConfigError
    key_dir, _ = keys
    with pytest.raises(ConfigError, match="both"):
        PeerKeys.from_files(str(key_dir / "client.key_secret"), "")
    with pytest.raises(ConfigError, match="no secret key"):
        PeerKeys.from_files(str(key_dir / "client.key"), str(key_dir / "broker.key"))


def test_health_of_a_curve_broker(procs, keys):
    key_dir, allow = keys
    url = f"tcp://127.0.0.1:{free_port()}"
    env = {"FRACTAL_BROKER_BIND": url, "FRACTAL_BROKER_CURVE_SECRET_KEY": str(key_dir / "broker.key_secret"),
           "FRACTAL_BROKER_CURVE_ALLOW_DIR": str(allow)}

    def health() -> int:
        import os
        return subprocess.run([sys.executable, "-m", "fractal", "health", "broker"], capture_output=True,
                              env=dict(os.environ, **env), timeout=30).returncode
    assert health() == 1
    procs.broker(url, "--curve-secret-key", env["FRACTAL_BROKER_CURVE_SECRET_KEY"], "--curve-allow-dir", str(allow))
    wait_for(lambda: health() == 0, 10, "the CURVE broker to count as healthy")


def test_an_unreadable_key_in_the_allow_list_stops_the_broker_with_a_clear_error(keys):
    key_dir, allow = keys
    (allow / "notes.key").write_text("hello")
    result = subprocess.run([sys.executable, "-m", "broker", "--bind", f"tcp://127.0.0.1:{free_port()}",
                             "--metrics-port", "0", "--curve-secret-key", str(key_dir / "broker.key_secret"),
                             "--curve-allow-dir", str(allow)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "unreadable key file" in result.stderr and "Traceback" not in result.stderr
