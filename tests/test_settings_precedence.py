"""The one settings loader (broker/settings.py) in process: a flag wins over the variable, the
variable over the default; values are converted to the field's type and refused with the name of
where they came from."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from broker.broker import BrokerSettings
from broker.errors import ConfigError
from broker.settings import add_arguments, load, log_format_setting, setting
from frontend.settings import FrontendSettings


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
