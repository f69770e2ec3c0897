"""The one error type the CLI catches and prints as a single line."""


class DgrunError(Exception):
    """Bad input or an unsupported request: the message is shown to the user as it is."""
