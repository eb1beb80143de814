"""What the command-line entry points share: flag parsing and error reporting.

    if __name__ == "__main__":
        cli.run(main)      # instead of absl's app.run(main)

An error the user can fix (`rlhf_jax.errors.UserError`; also a --config flag naming no key, a config file
that does not exist, an unknown preset) prints as one line, `error: <message>`, and exits with status 1.
Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable

from absl import app, flags

from rlhf_jax.errors import UserError


def run(main: Callable[[list[str]], None]) -> None:
    """absl's app.run(main), with user errors reported as above."""

    def guarded(argv):
        try:
            return main(argv)
        except UserError as e:
            raise SystemExit(f"error: {e}") from None

    app.run(guarded, flags_parser=parse_flags)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (what app.run does by default), with the --config mistakes a user makes reported as
    user errors: a config file that does not exist (ml_collections would raise only when the config is first
    read), an override naming no key, a preset get_config rejects (both would print tracebacks)."""
    path = _config_file(argv)
    if path is not None and not os.path.isfile(path):
        raise SystemExit(
            f"error: --config={path}: no such file. Pass a config file, e.g. --config=configs/sft.py:tiny."
        )
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:  # ml_collections: an override naming no field
        flag = _override_naming(_innermost(e), argv)
        if flag is None:
            raise
        close = re.search(r'Did you mean "([^"]+)"', str(e))
        raise SystemExit(
            f"error: {flag}: no such config key." + (f' Did you mean "{close[1]}"?' if close else "")
        ) from None
    except flags.Error as e:  # absl's message is one line, or holds the traceback of a bug in get_config
        root = _innermost(e)
        raise SystemExit(f"error: {root if isinstance(root, UserError) else e}") from None


def _innermost(e: BaseException) -> BaseException:
    """The first exception of the chain that led to `e` (its causes, or those it was raised while handling)."""
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    return e


def _override_naming(missing: BaseException, argv: list[str]) -> str | None:
    """The --config.<path> override whose path holds the key of ml_collections' KeyError `missing`, or None."""
    if not isinstance(missing, KeyError) or not missing.args:
        return None
    key = str(missing.args[0])
    for arg in argv[1:]:
        name = arg.split("=", 1)[0]
        if name.startswith("--config.") and key in name.removeprefix("--config.").split("."):
            return name
    return None


def _config_file(argv: list[str]) -> str | None:
    """The file of --config=<file>[:<preset>], or None."""
    for i, arg in enumerate(argv[1:], start=1):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1].split(":", 1)[0]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1].split(":", 1)[0]
    return None
