"""dhkd-pipe: Dual-Head Knowledge Distillation from a cached teacher."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dhkd-pipe")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"
