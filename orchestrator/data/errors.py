"""The data plane's user error, below every data module so that each can raise it."""


class DataError(ValueError):
    """A data problem the user must fix (credentials, missing prefix, bad manifest); the message is one line."""
