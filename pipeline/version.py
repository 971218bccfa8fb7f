"""The installed tool's version, recorded in every store and result file."""

from __future__ import annotations


def tool_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dhkd-pipe")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "0.0.0"
