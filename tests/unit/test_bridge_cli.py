"""`edgeloop bridge --help` tells an operator the defaults that apply."""

from __future__ import annotations

from click.testing import CliRunner

from edgeloop.cli.bridge_cmd import bridge


def test_bridge_help_shows_the_defaults() -> None:
    """The options default to None (so EDGELOOP_BRIDGE_* variables still apply), which
    used to hide every default from --help, the Receive Maximum's 1000 included."""
    out = CliRunner().invoke(bridge, ["--help"], terminal_width=200).output
    for shown in ("edgeloop-bridge-1", "1000", "full", "native"):
        assert f"[default: ({shown})]" in out, out
