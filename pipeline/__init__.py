"""dhkd-pipe: Dual-Head Knowledge Distillation from a cached teacher."""


def __getattr__(name):  # __version__ on first use: importlib.metadata costs the CLI's start-up ~50 ms
    if name != "__version__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dhkd-pipe")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "0.0.0"
