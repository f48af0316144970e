"""The `fractal` console script: serve | broker | worker | frontend | predict | models."""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

from broker.settings import add_arguments, load, setting

from .addresses import connect_host
from .serve import BROKER_HOST, BROKER_PORT


def parser() -> argparse.ArgumentParser:
    """`fractal`'s own parser: one subparser per command, so argparse writes the usage text. Each
    command parses its own arguments (the frontend's go to gunicorn), so only the name is read here."""
    top = argparse.ArgumentParser(prog="fractal", description="FRACTAL ML Server: ONNX models over REST, gRPC "
                                  "and ZeroMQ (MDP/0.2).", epilog="fractal COMMAND --help lists its flags.")
    commands = top.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, summary) in COMMANDS.items():
        commands.add_parser(name, help=summary, add_help=False)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        command = parser().parse_args(argv[:1]).command  # NOTE: --help exits 0, an unknown name 2
    except SystemExit as exc:
        return int(exc.code or 0)
    return COMMANDS[command][0](argv[1:])


def _serve(argv: list[str]) -> int:
    from broker.errors import ConfigError
    from broker.logs import setup_logging

    from .serve import ServeSettings, serve
    parser = argparse.ArgumentParser(prog="fractal serve", description=(
        "Run the broker, workers and the REST frontend on this machine."))
    add_arguments(parser, ServeSettings, "serve")
    try:
        settings = load(ServeSettings, "serve", parser.parse_args(argv))
    except ConfigError as exc:
        print(f"fractal serve: {exc}", file=sys.stderr)
        return 2
    setup_logging("serve", settings.log_level, settings.log_format)
    return serve(settings)


def _broker(argv: list[str]) -> int:
    from broker.__main__ import main as broker_main
    return broker_main(argv)


def _worker(argv: list[str]) -> int:
    from worker.__main__ import main as worker_main
    return worker_main(argv)


def _frontend(argv: list[str]) -> int:
    """exec gunicorn on the app factory; FRACTAL_FRONTEND_* configures the app itself."""
    if argv and argv[0] in ("-h", "--help"):
        from .gunicorn_args import DEFAULTS
        print("usage: fractal frontend [GUNICORN ARGUMENTS]\n\nRuns the REST frontend under gunicorn; "
              f"arguments go to gunicorn (default: {' '.join(DEFAULTS)}; the worker class must be an ASGI "
              "one). The app "
              "reads its settings from FRACTAL_FRONTEND_* variables, plus "
              "FRACTAL_ADMIN_TOKEN and FRACTAL_API_TOKEN (README, \"Configuration\").")
        return 0
    from .gunicorn_args import DEFAULTS, gunicorn_base
    os.execv(sys.executable, [*gunicorn_base(), *(argv or DEFAULTS)])
    return 1  # not reached


def _grpc(argv: list[str]) -> int:
    """exec the gRPC frontend's module (nothing imports `frontend`; it runs as its own program)."""
    os.execv(sys.executable, [sys.executable, "-m", "frontend.oip_grpc", *argv])
    return 1  # not reached


@dataclass(frozen=True)
class ClientSettings:
    """Where `fractal predict` and `fractal models` find the broker: the same defaults and variables
    as `fractal serve`, so a local server needs no flags."""
    broker: str = setting("", "broker endpoint, e.g. tcp://host:5555 (wins over --broker-host/--broker-port)",
                          env="FRACTAL_CLIENT_BROKER")
    broker_host: str = setting(BROKER_HOST, "broker host (as fractal serve's; 0.0.0.0 means this host)",
                               env="FRACTAL_SERVE_BROKER_HOST")
    broker_port: int = setting(BROKER_PORT, "broker port (as fractal serve's)", env="FRACTAL_SERVE_BROKER_PORT")
    timeout_s: float = setting(10.0, "deadline of the call", env="FRACTAL_CLIENT_TIMEOUT_S")
    curve_secret_key: str = setting("", "CURVE: this client's .key_secret file, for a broker with CURVE on",
                                    env="FRACTAL_CLIENT_CURVE_SECRET_KEY")
    curve_broker_key: str = setting("", "CURVE: the broker's public .key file", env="FRACTAL_CLIENT_CURVE_BROKER_KEY")

    def endpoint(self) -> str:
        if self.broker:
            return self.broker
        return f"tcp://{connect_host(self.broker_host)}:{self.broker_port}"

    def client(self):
        """The direct client these settings describe; raises ConfigError for unreadable key files."""
        from broker.client import Client
        from broker.curve import PeerKeys
        return Client(self.endpoint(), timeout_s=self.timeout_s,
                      curve=PeerKeys.from_files(self.curve_secret_key, self.curve_broker_key))


def _client_args(prog: str, description: str, argv: list[str],
                 extra: Callable[[argparse.ArgumentParser], None] = lambda parser: None):
    """(arguments, settings) of a client command; exits 2 with one line on bad settings."""
    from broker.errors import ConfigError
    parser = argparse.ArgumentParser(prog=prog, description=description)
    extra(parser)
    add_arguments(parser, ClientSettings, "client")
    args = parser.parse_args(argv)
    try:
        return args, load(ClientSettings, "client", args)
    except ConfigError as exc:
        parser.exit(2, f"{prog}: {exc}\n")


def _predict(argv: list[str]) -> int:
    import numpy as np

    from broker.errors import FractalError

    def positional(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("model", help="model name, e.g. iris or iris.onnx")
        parser.add_argument("values", nargs="+", type=float, help="the row, e.g. 2 5 1 4")
        parser.add_argument("--version", default=None, help="the model version (default: the newest served)")
    args, settings = _client_args("fractal predict", "One prediction on one row of numbers, printed as JSON.",
                                  argv, positional)
    try:
        with settings.client() as client:
            outputs = client.predict(args.model, [np.array(args.values)], version=args.version)
    except FractalError as exc:
        print(f"fractal predict: {_explain(exc, settings)}", file=sys.stderr)
        return 1
    print(json.dumps({k: v.tolist() if hasattr(v, "tolist") else v for k, v in outputs.items()}))
    return 0


def _models(argv: list[str]) -> int:
    from broker.errors import FractalError
    _, settings = _client_args("fractal models", "List the models in the pool with their descriptions.", argv)
    try:
        with settings.client() as client:
            for entry in client.information():
                print(f"{entry['model']}\t{entry['description']}")
    except FractalError as exc:
        print(f"fractal models: {_explain(exc, settings)}", file=sys.stderr)
        return 1
    return 0


def _explain(exc: Exception, settings: ClientSettings) -> str:
    from broker.errors import NoWorkerAvailable, Timeout
    text = f"{exc.__class__.__name__}: {exc}"
    if isinstance(exc, (NoWorkerAvailable, Timeout)):
        asked = "" if settings.endpoint() in text else f"asked {settings.endpoint()}; "
        text += (f" ({asked}is fractal serve running? point at its broker with --broker-host/--broker-port "
                 f"or --broker URL; a broker with CURVE on also needs --curve-secret-key and --curve-broker-key)")
    return text


def _keys(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fractal keys", description=(
        "Write CURVE key pairs: give the broker's NAME.key to workers and clients, and put their .key "
        "files in the broker's curve_allow_dir."))
    parser.add_argument("directory")
    parser.add_argument("names", nargs="+", help="e.g. broker worker-1 frontend")
    args = parser.parse_args(argv)
    from broker.curve import generate
    for name in args.names:
        public, secret = generate(args.directory, name)
        print(f"{public}\n{secret}")
    return 0


def _health(argv: list[str]) -> int:
    from .health import main as health_main
    return health_main(argv)


COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "serve": (_serve, "broker + workers + REST frontend on this machine, bundled models (start here)"),
    "broker": (_broker, "the MDP/0.2 broker"),
    "worker": (_worker, "one worker: serves the models of a pool to the broker"),
    "frontend": (_frontend, "the REST frontend under gunicorn (extra arguments go to gunicorn)"),
    "grpc": (_grpc, "the Open Inference Protocol over gRPC (Triton's GRPCInferenceService)"),
    "predict": (_predict, "MODEL VALUES...: one prediction through the broker (fractal predict iris 2 5 1 4)"),
    "models": (_models, "list the models in the pool"),
    "health": (_health, "[ROLE [HTTP_PORT]]: exit 0 if this host's broker/worker/frontend/serve answers "
                        "(HTTP_PORT: the frontend's or serve's; default 8002, or FRACTAL_SERVE_HTTP_PORT for serve)"),
    "keys": (_keys, "DIR NAME...: CURVE key pairs (NAME.key public, NAME.key_secret secret)"),
}

if __name__ == "__main__":
    sys.exit(main())
