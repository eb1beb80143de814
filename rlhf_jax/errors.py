"""Errors a user can fix: a config value, a path that does not exist, a run that diverged.

The command-line entry points (`rlhf_jax.cli.run`) print a UserError as one line, `error: <message>`, and
exit with status 1; any other exception is a bug and keeps its traceback. So the message is the whole story:
it names the key or file and what would fix it. Each class is also the built-in exception it refines, so
`except ValueError` (or FileNotFoundError) still catches it in a notebook or a test.
"""


class UserError(Exception):
    """An error in what the user asked for, not in the code."""


class ConfigError(UserError, ValueError):
    """A config key with an unknown or impossible value (or a field no config has)."""


class DataError(UserError, ValueError):
    """A data file's line or record that cannot be read in the config's format; the message gives the file
    and line (`path:N:`) and what to change."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory the config or a flag names does not exist, or lacks what it must hold."""


class WorkdirError(UserError, NotADirectoryError):
    """--workdir names something that cannot hold a run (an existing file)."""
