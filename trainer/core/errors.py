"""User-facing errors: one line, no traceback, non-zero exit."""


class UserError(Exception):
    """A problem with the user's input (config, flags, files). Printed as one line, exit code 2."""

    exit_code = 2


class ConfigError(UserError):
    """A config value that failed validation; the message names the file and YAML path."""
