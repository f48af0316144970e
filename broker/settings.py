"""The one settings loader: CLI flag, else FRACTAL_<COMPONENT>_<FIELD>, else the dataclass default.

Every component describes its settings as a frozen dataclass; flags are generated from its fields,
so a setting exists in exactly one place and is always reachable both as a flag and as env.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from typing import TYPE_CHECKING, Any, Mapping, TypeVar

from .errors import ConfigError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")  # settings classes are dataclasses

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def env_name(component: str, field: str) -> str:
    return f"FRACTAL_{component.upper()}_{field.upper()}"


def field_env(component: str, f: dataclasses.Field) -> str:
    """A field's variable: FRACTAL_<COMPONENT>_<FIELD>, or the one its metadata names."""
    return f.metadata.get("env") or env_name(component, f.name)


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, cls: type, component: str) -> None:
    """Add one flag per settings field; defaults stay None so env and dataclass defaults show through."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = "" if f.metadata.get("secret") else f", default {default!r}"
        help_text = f"{help_text} (env {field_env(component, f)}{shown})".strip()
        if hints[f.name] is bool:
            parser.add_argument(flag_name(f.name), dest=f.name, default=None,
                                action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(flag_name(f.name), dest=f.name, default=None, metavar=f.name.upper(),
                                help=help_text)


def _convert(raw: Any, kind: type, name: str) -> Any:
    if not isinstance(raw, str):
        return raw
    try:
        if kind is bool:
            low = raw.strip().lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError(raw)
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
    except ValueError:
        raise ConfigError(f"{name}: cannot read {raw!r} as {kind.__name__}") from None
    return raw


def load(cls: type[T], component: str, flags: Mapping[str, Any] | argparse.Namespace | None = None,
         env: Mapping[str, str] | None = None) -> T:
    """Build `cls` from flags (None means unset), then env, then defaults; raises ConfigError."""
    if isinstance(flags, argparse.Namespace):
        flags = vars(flags)
    flags = flags or {}
    env = os.environ if env is None else env
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        raw = flags.get(f.name)
        source = flag_name(f.name)
        for name in dict.fromkeys((field_env(component, f), env_name(component, f.name))):
            if raw is None and name in env:
                source, raw = name, env[name]
        if raw is not None:
            values[f.name] = _convert(raw, hints[f.name], source)
    for f in dataclasses.fields(cls):
        choices = f.metadata.get("choices")
        if choices and f.name in values and values[f.name] not in choices:
            raise ConfigError(f"{f.name} must be one of {', '.join(choices)}, not {values[f.name]!r}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from exc


def setting(default: Any, help: str, env: str | None = None, secret: bool = False,  # noqa: A002
            choices: tuple[str, ...] = ()) -> Any:
    """A dataclass field with its help text; `env` names its variable when the default name will not
    do, `secret` keeps its value out of --help, `choices` are the only values load() accepts."""
    return dataclasses.field(default=default, metadata={"help": help, "env": env, "secret": secret,
                                                        "choices": choices})


def tracing_setting() -> Any:
    """Every component's `tracing`: one variable, FRACTAL_TRACING, for all of them (metrics/tracing.py)."""
    return setting(False, "OpenTelemetry tracing (needs the otel extra); the OTEL_* variables configure it",
                   env="FRACTAL_TRACING")


def log_format_setting() -> Any:
    """Every component's `log_format`: one variable, FRACTAL_LOG_FORMAT, for all of them (broker/logs.py)."""
    return setting("text", "log lines as text, or json: one object per line", env="FRACTAL_LOG_FORMAT",
                   choices=("text", "json"))


# Fields several components share, each defined once with its default and help text (and, for the
# tokens, its one variable and its secrecy); a component names only what differs: whose key, which peer,
# which port. Each is read as FRACTAL_<COMPONENT>_<FIELD> unless it names its own variable.

def heartbeat_interval_setting(peer: str) -> Any:
    """`heartbeat_interval_s` of a component that beats to `peer` (default 2.5 s)."""
    return setting(2.5, f"seconds between heartbeats to {peer}")


def check_heartbeat(interval_s: float, liveness: int) -> None:
    """The one rule of every heartbeat_interval_s / heartbeat_liveness pair (its settings' __post_init__)."""
    if interval_s <= 0 or liveness < 1:
        raise ValueError("heartbeat_interval_s must be > 0 and heartbeat_liveness >= 1")


def heartbeat_liveness_setting(then: str) -> Any:
    """`heartbeat_liveness`: missed heartbeats before `then` happens (default 3)."""
    return setting(3, f"missed heartbeats before {then}")


def curve_secret_key_setting(whose: str) -> Any:
    """`curve_secret_key`: `whose` .key_secret file; empty, the default, is no CURVE (broker/curve.py)."""
    return setting("", f"CURVE: {whose} .key_secret file (empty: no CURVE)")


def curve_broker_key_setting() -> Any:
    """`curve_broker_key` of a peer of the broker: the broker's public key file."""
    return setting("", "CURVE: the broker's public .key file")


def metrics_host_setting() -> Any:
    """`metrics_host` of a component that serves its own /metrics (metrics/exporter.py)."""
    return setting("127.0.0.1", "address of the /metrics endpoint")


def metrics_port_setting(default: int) -> Any:
    """`metrics_port`: each component has its own default port; 0 turns its metrics off."""
    return setting(default, "port of the /metrics endpoint; 0: no metrics at all")


def log_level_setting() -> Any:
    """Every component's `log_level`."""
    return setting("INFO", "logging level")


def admin_token_setting(guards: str) -> Any:
    """A frontend's `admin_token`: one variable, FRACTAL_ADMIN_TOKEN, for all of them; never shown."""
    return setting("", f"bearer token required for {guards}; empty: open", env="FRACTAL_ADMIN_TOKEN", secret=True)


def api_token_setting(guards: str) -> Any:
    """A frontend's `api_token`: one variable, FRACTAL_API_TOKEN, for all of them; never shown."""
    return setting("", f"bearer token required for {guards}; empty: open", env="FRACTAL_API_TOKEN", secret=True)


def client_broker_setting() -> Any:
    """A frontend's `broker`: the endpoints its client connects to (endpoint_list)."""
    return setting("tcp://127.0.0.1:5555", "broker endpoint the frontend's client connects to; several, "
                                           "comma-separated: fail over between them")


def client_service_setting() -> Any:
    """A frontend's `service`: the MDP service its client sends model operations to."""
    return setting("modelhost", "MDP service the models are served under")


def endpoint_list(value: str | typing.Sequence[str]) -> tuple[str, ...]:
    """The broker endpoints a comma-separated setting (or a list) names, in order, e.g.
    "tcp://a:5555,tcp://b:5555"; raises ConfigError when it names none. One endpoint is one broker;
    several are brokers that share nothing, which clients fail over between and workers serve all of."""
    items = value.split(",") if isinstance(value, str) else list(value)
    endpoints = tuple(dict.fromkeys(item.strip() for item in items if item.strip()))
    if not endpoints:
        raise ConfigError(f"no broker endpoint in {value!r}")
    return endpoints
