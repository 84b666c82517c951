"""The one base of every error l4lb reports to a user.

Each module keeps its own subclass (ConfigError, DaemonError, ApiError, ...); the
message says what went wrong and what to do. The CLI catches L4lbError and prints
it; anything else that escapes is a bug and keeps its traceback.
"""


class L4lbError(Exception):
    """An error with a message for the user (see the subclasses in each module)."""
