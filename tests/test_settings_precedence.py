"""The one settings loader (broker/settings.py) in process: a flag wins over the variable, the
variable over the default; values are converted to the field's type and refused with the name of
where they came from."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

import pytest

from broker.broker import BrokerSettings
from broker.errors import ConfigError
from broker.settings import add_arguments, field_env, load, log_format_setting, setting
from frontend.oip_grpc.settings import GrpcSettings
from frontend.settings import FrontendSettings
from worker.settings import WorkerSettings


@dataclass(frozen=True)
class Sample:
    interval_s: float = setting(2.5, "seconds")
    count: int = setting(3, "how many")
    enabled: bool = setting(True, "on or off")
    name: str = setting("x", "a name")
    token: str = setting("", "a secret", env="FRACTAL_SAMPLE_TOKEN_FILE", secret=True)
    log_format: str = log_format_setting()


def test_defaults_when_nothing_is_set() -> None:
    assert load(Sample, "demo", {}, {}) == Sample()


def test_a_variable_beats_the_default_and_is_converted_to_the_fields_type() -> None:
    env = {"FRACTAL_DEMO_INTERVAL_S": "0.5", "FRACTAL_DEMO_COUNT": "7", "FRACTAL_DEMO_ENABLED": "off",
           "FRACTAL_DEMO_NAME": "y"}
    assert load(Sample, "demo", {}, env) == Sample(0.5, 7, False, "y")


def test_a_flag_beats_the_variable_and_an_unset_flag_lets_it_through() -> None:
    env = {"FRACTAL_DEMO_COUNT": "7", "FRACTAL_DEMO_NAME": "from-env"}
    loaded = load(Sample, "demo", {"count": "9", "name": None}, env)
    assert (loaded.count, loaded.name) == (9, "from-env")


def test_flags_parsed_by_argparse_feed_the_same_loader() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser, Sample, "demo")
    args = parser.parse_args(["--interval-s", "1.5", "--no-enabled"])
    assert load(Sample, "demo", args, {"FRACTAL_DEMO_INTERVAL_S": "9"}) == Sample(1.5, 3, False)
    assert "FRACTAL_SAMPLE_TOKEN_FILE" in parser.format_help()  # a field's own variable name


def test_a_field_with_its_own_variable_reads_that_one_first() -> None:
    env = {"FRACTAL_SAMPLE_TOKEN_FILE": "a", "FRACTAL_DEMO_TOKEN": "b", "FRACTAL_LOG_FORMAT": "json"}
    loaded = load(Sample, "demo", {}, env)
    assert (loaded.token, loaded.log_format) == ("a", "json")
    assert load(Sample, "demo", {}, {"FRACTAL_DEMO_TOKEN": "b"}).token == "b"  # the usual name still works


@pytest.mark.parametrize(("env", "message"), [
    ({"FRACTAL_DEMO_COUNT": "many"}, "FRACTAL_DEMO_COUNT: cannot read 'many' as int"),
    ({"FRACTAL_DEMO_ENABLED": "maybe"}, "FRACTAL_DEMO_ENABLED: cannot read 'maybe' as bool"),
    ({"FRACTAL_LOG_FORMAT": "xml"}, "log_format must be one of text, json, not 'xml'"),
])
def test_bad_values_are_a_config_error_naming_their_source(env: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(Sample, "demo", {}, env)


def test_a_bad_flag_names_the_flag() -> None:
    with pytest.raises(ConfigError, match="--count: cannot read"):
        load(Sample, "demo", {"count": "x"}, {"FRACTAL_DEMO_COUNT": "1"})


def test_the_components_own_checks_become_config_errors() -> None:
    with pytest.raises(ConfigError, match="heartbeat_liveness"):
        load(BrokerSettings, "broker", {}, {"FRACTAL_BROKER_HEARTBEAT_LIVENESS": "0"})
    assert load(BrokerSettings, "broker", {}, {"FRACTAL_BROKER_MAX_QUEUE": "5"}).max_queue == 5
    assert load(FrontendSettings, "frontend", {}, {"FRACTAL_ADMIN_TOKEN": "t"}).admin_token == "t"


COMPONENTS = {"broker": BrokerSettings, "worker": WorkerSettings, "frontend": FrontendSettings, "grpc": GrpcSettings}
SHARED = {"heartbeat_interval_s": 2.5, "heartbeat_liveness": 3, "curve_secret_key": "", "curve_broker_key": "",
          "metrics_host": "127.0.0.1", "log_level": "INFO", "log_format": "text", "tracing": False,
          "admin_token": "", "api_token": "", "broker": "tcp://127.0.0.1:5555", "service": "modelhost"}
ONE_VARIABLE = {"log_format": "FRACTAL_LOG_FORMAT", "tracing": "FRACTAL_TRACING", "admin_token": "FRACTAL_ADMIN_TOKEN",
                "api_token": "FRACTAL_API_TOKEN"}


@pytest.mark.parametrize("component", COMPONENTS)
def test_a_shared_field_has_one_default_and_variable_wherever_it_appears(component: str) -> None:
    """The fields broker/settings.py defines once for several components: same default everywhere, read
    as FRACTAL_<COMPONENT>_<FIELD> or from the one variable all components share; tokens never shown."""
    fields = {f.name: f for f in dataclasses.fields(COMPONENTS[component]) if f.name in SHARED}
    assert {"curve_secret_key", "log_level", "log_format"} <= set(fields)
    for name, f in fields.items():
        assert f.default == SHARED[name], (component, name)
        assert field_env(component, f) == ONE_VARIABLE.get(name, f"FRACTAL_{component.upper()}_{name.upper()}")
        assert f.metadata["secret"] == name.endswith("_token"), (component, name)
        assert f.metadata["help"], (component, name)
    ports = {"broker": 9150, "worker": 9151, "grpc": 9149}  # each its own; the frontend has none (gunicorn)
    if component in ports:
        assert COMPONENTS[component]().metrics_port == ports[component]
