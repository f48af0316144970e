"""ZeroMQ CURVE: encryption and client authentication between every peer and the broker.

The broker holds a key pair and admits only peers whose public key file is in its allow-list
directory (pyzmq's zmq.auth, ZAP); workers and clients hold their own pair and the broker's public
key. `fractal keys DIR NAME` writes NAME.key (public, share it) and NAME.key_secret (keep it).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from .errors import ConfigError

log = logging.getLogger(__name__)


def generate(directory: str | Path, name: str) -> tuple[Path, Path]:
    """Write a key pair; returns (public key file, secret key file)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(str(directory), name)
    return Path(public), Path(secret)


def _load(path: str, secret: bool) -> tuple[bytes, bytes | None]:
    try:
        public, private = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read CURVE key file {path}: {exc}") from None
    if secret and private is None:
        raise ConfigError(f"{path} holds no secret key (use the .key_secret file)")
    return public, private


@dataclass(frozen=True)
class PeerKeys:
    """What a worker or client needs: its own key pair and the broker's public key."""
    public: bytes
    secret: bytes
    broker_public: bytes

    @classmethod
    def from_files(cls, secret_file: str, broker_public_file: str) -> "PeerKeys | None":
        """None when both paths are empty (CURVE off); ConfigError when only one is given."""
        if not secret_file and not broker_public_file:
            return None
        if not (secret_file and broker_public_file):
            raise ConfigError("CURVE needs both this peer's .key_secret file and the broker's .key file")
        public, secret = _load(secret_file, secret=True)
        if secret is None:  # _load raised already; this tells the type checker
            raise ConfigError(f"{secret_file} holds no secret key")
        return cls(public, secret, _load(broker_public_file, secret=False)[0])

    def apply(self, sock: zmq.Socket) -> None:
        sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = self.public, self.secret, self.broker_public


class BrokerCurve:
    """The broker's side: its key pair on the ROUTER, and a ZAP thread checking peers' keys."""

    def __init__(self, context: zmq.Context, secret_file: str, allow_dir: str):
        if not (secret_file and allow_dir):
            raise ConfigError("CURVE on the broker needs curve_secret_key and curve_allow_dir")
        if not Path(allow_dir).is_dir():
            raise ConfigError(f"curve_allow_dir {allow_dir} is not a directory")
        try:  # NOTE: zmq.auth only logs a bad file and then admits nobody; refuse to start instead
            admitted = zmq.auth.load_certificates(str(allow_dir))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"curve_allow_dir {allow_dir} holds an unreadable key file: {exc}") from None
        if not admitted:
            raise ConfigError(f"curve_allow_dir {allow_dir} holds no .key file: no peer could connect")
        self.public, self.secret = _load(secret_file, secret=True)
        self._auth = ThreadAuthenticator(context, log=logging.getLogger("broker.curve.zap"))
        self._auth.start()
        self._auth.configure_curve(domain="*", location=str(allow_dir))
        log.info("CURVE on: %d admitted keys in %s (read at start: restart to apply changes)",
                 len(admitted), allow_dir)

    def apply(self, sock: zmq.Socket) -> None:
        sock.curve_server = True
        sock.curve_publickey, sock.curve_secretkey = self.public, self.secret

    def stop(self) -> None:
        self._auth.stop()
