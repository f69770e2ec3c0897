"""The one error type the CLI catches and prints as a single line, and the library's notices."""

import logging


class DgrunError(Exception):
    """Bad input or an unsupported request: the message is shown to the user as it is."""


def notice(message: str) -> None:
    """Something the user may want to know; the CLI prints it once per process on stderr, the API stays quiet."""
    logging.getLogger("dgrun").info(message)
