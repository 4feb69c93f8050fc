"""Settings loaded from a command's options: a bad value is blamed on the option.

`_Base.load` validates options and environment together; a `ValidationError` names the
model's field (`web_port`), which the user never typed. For a field set by an option of
the running command, the error becomes click's usage error naming that option
(`--workers-web-port`); values from the environment keep the entry point's message,
which names the variable (cli.main).
"""

from __future__ import annotations

from typing import Any

import click
from pydantic import ValidationError


def load_settings(model: Any, **overrides: Any) -> Any:
    """`model.load(**overrides)`, with each invalid override reported as its option.

    Args:
        model: a settings class (`core.settings._Base` subclass).
        overrides: field -> value, from the running command's options (field names equal
            the options' parameter names).

    Returns:
        The loaded settings.

    Raises:
        click.BadParameter: an override does not validate; names the option, the rule and
            the value.
        ValidationError: a value from the environment or the endpoints file does not.
    """
    try:
        return model.load(**overrides)
    except ValidationError as exc:
        ctx = click.get_current_context(silent=True)
        params = {p.name: p for p in ctx.command.params} if ctx is not None else {}
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else ""
            if field in overrides and field in params:
                raise click.BadParameter(
                    f"{_message(err)} (got {err.get('input')!r})", ctx=ctx, param=params[field]
                ) from None
        raise


def _message(err: Any) -> str:
    """pydantic's message without the "Value error, " it puts before a validator's own."""
    return str(err["msg"]).removeprefix("Value error, ")
