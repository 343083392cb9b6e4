"""The errors a user causes and can fix. `cli.run` prints them as one `error: …` line; anything else is our bug
and keeps its traceback.

Every message names what is wrong (the file, config key or tensor) and how to fix it. They subclass ValueError so
that callers catching ValueError keep working.
"""

from __future__ import annotations


class UserError(ValueError):
    """An error in what the user gave us: a config, an input file, a checkpoint, a run directory."""


class ConfigError(UserError):
    """An invalid config file, override or value."""


class InputError(UserError):
    """An input file or directory that is missing, malformed or not the kind the command expects."""


class CheckpointError(InputError):
    """A model checkpoint (Hugging Face, Orbax or training) that cannot be read or does not match the config."""


class RunDirError(UserError):
    """A run or output directory that cannot be used as asked: another run's, someone else's files, locked."""
