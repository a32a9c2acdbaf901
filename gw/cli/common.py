"""What every command shares: click's settings, the one-line failure, loading the configuration
and printing JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from ..core.config import load_config
from ..core.settings import DEFAULT_CONFIG_PATH, Settings
from ..core.errors import ConfigError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class Failure(click.ClickException):
    """One line on stderr, exit code 1 (or the given one)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.exit_code = code

    def show(self, file=None):
        click.echo(f"oakestra-gw: {self.format_message()}", err=True)


def reason(exc: Exception) -> str:
    """The message of a gateway error (or a Failure), else the exception's text."""
    return getattr(exc, "message", None) or str(exc)


def warn(text: str) -> None:
    click.echo(f"oakestra-gw: warning: {text}", err=True)


def echo_json(doc) -> None:
    click.echo(json.dumps(doc, indent=2))


def config_failure(exc: ConfigError, path) -> Failure:
    from ..core.errors import one_line

    return Failure(f"config error: {one_line(exc)}" + ("" if str(path) in exc.message
                                                        else f" ({path})"), code=2)


def load(path: str | None, required: bool = True) -> Settings | None:
    """The settings of `path`; the default path may be missing when not `required`."""
    if path is None:
        path = os.environ.get("OAKESTRA_GW_CONFIG") or DEFAULT_CONFIG_PATH
        if not required and not Path(path).exists():
            return None
    try:
        return load_config(path)
    except ConfigError as exc:
        raise config_failure(exc, path) from None


config_option = click.option(
    "--config", "-c", "config_path", metavar="FILE", envvar="OAKESTRA_GW_CONFIG",
    help=f"The gateway's configuration [default: {DEFAULT_CONFIG_PATH}; env OAKESTRA_GW_CONFIG]")
