"""dgrun: a local runtime for DiffusionGemma."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dgrun")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

from dgrun.api import Model, Result, load  # noqa: E402
from dgrun.errors import DgrunError  # noqa: E402

__all__ = ["load", "Model", "Result", "DgrunError", "__version__"]
