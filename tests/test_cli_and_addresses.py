"""The `fractal` command's usage text (argparse writes it from the command table) and the one rule
that turns a wildcard bind address into one to connect to; in process."""
from __future__ import annotations

import pytest

from fractal.addresses import connect_endpoint, connect_host
from fractal.cli import COMMANDS, ClientSettings, main


def test_help_lists_every_command_with_its_summary(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines at the terminal's width
    assert text.startswith("usage: fractal [-h] COMMAND ...")
    for name, (_, summary) in COMMANDS.items():
        assert f"{name} {' '.join(summary.split())}" in text


@pytest.mark.parametrize("argv", [[], ["nope"], ["--nope"]])
def test_no_or_an_unknown_command_exits_2_naming_the_choices(argv: list[str],
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: fractal") and ("invalid choice" in err or "required" in err)


def test_a_command_parses_its_own_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["keys", "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: fractal keys")


@pytest.mark.parametrize(("host", "expected"), [("0.0.0.0", "127.0.0.1"), ("*", "127.0.0.1"), ("", "127.0.0.1"),
                                                ("10.0.0.2", "10.0.0.2"), ("broker", "broker")])
def test_a_wildcard_host_is_reached_on_127_0_0_1(host: str, expected: str) -> None:
    assert connect_host(host) == expected
    assert ClientSettings(broker_host=host, broker_port=5555).endpoint() == f"tcp://{expected}:5555"


@pytest.mark.parametrize(("bind", "expected"), [
    ("tcp://0.0.0.0:5555", "tcp://127.0.0.1:5555"), ("tcp://*:5555", "tcp://127.0.0.1:5555"),
    ("tcp://10.0.0.2:5555", "tcp://10.0.0.2:5555"), ("inproc://broker", "inproc://broker"),
])
def test_a_wildcard_bind_endpoint_is_reached_on_127_0_0_1(bind: str, expected: str) -> None:
    assert connect_endpoint(bind) == expected
