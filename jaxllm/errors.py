"""Errors meant for people: `main` prints their message on one line, never a traceback."""


class JaxllmError(Exception):
    """Base class for every error jaxllm reports to the user as a one-line message."""


class ConfigError(JaxllmError):
    """A config file, key or value that cannot work; the message names the key."""


class DataError(JaxllmError):
    """Input data that cannot be read; the message names the file (and line)."""


class RunDirError(JaxllmError):
    """A run directory that would be overwritten or resumed against the user's intent."""


class PromptError(JaxllmError, ValueError):
    """A prompt the model cannot take (too long for its learned positions, ids outside its
    vocabulary): one line for a user; still a ValueError for library callers."""
