"""YAML recipes read with bounds: a small file cannot expand (through aliases) or nest into
something that exhausts memory or the stack; a key given twice, or a scalar that cannot be built
(a date that does not exist, an integer of thousands of digits), is one line too.

``yaml.safe_load`` builds no objects from tags, but an alias is a reference: nine nested levels of
ten aliases each are a billion leaves as soon as anything walks the result (an error message's
``repr``, a copy). The document is composed first, its size counted as if every alias were
expanded (with memoisation, so the count itself is cheap), and only a bounded document is built.
"""

from __future__ import annotations

import yaml

from dhkd_pipe.errors import DhkdError

MAX_BYTES = 1 << 20  # a recipe is a screen of options; a megabyte is already absurd
MAX_NODES = 100_000  # scalars, lists and mappings after expanding every alias
MAX_DEPTH = 64


def read_text(path: str, what: str = "config") -> str:
    """The file's text: at most ``MAX_BYTES``, UTF-8 (a refusal names the first bad byte)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as e:
        from dhkd_pipe.errors import io_error

        raise io_error(path, e, "read") from None
    if len(data) > MAX_BYTES:
        raise DhkdError(f"{what} {path} is larger than {MAX_BYTES >> 20} MiB; a recipe is a short YAML mapping")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DhkdError(
            f"{what} {path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); save it as UTF-8"
        ) from None


def load(text: str, source: str, what: str = "config"):
    """The YAML document in ``text`` (safe tags only), refused when its aliases expand past
    ``MAX_NODES`` nodes or it nests deeper than ``MAX_DEPTH``."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_size(node, source, what)
        return loader.construct_document(node)
    except (ValueError, OverflowError) as e:  # a scalar its constructor refuses: 2024-13-45, 5,000 digits
        raise DhkdError(
            f"cannot parse {what} {source}: a value cannot be read ({' '.join(str(e).split())[:120]})"
        ) from None
    except yaml.YAMLError as e:
        raise DhkdError(f"cannot parse {what} {source}: {str(e).splitlines()[0]}") from None
    except RecursionError:
        raise DhkdError(f"cannot parse {what} {source}: nested deeper than {MAX_DEPTH} levels") from None
    finally:
        loader.dispose()


def _check_size(root: yaml.Node, source: str, what: str):
    sizes: dict[int, int] = {}

    def size(node: yaml.Node, depth: int) -> int:
        if depth > MAX_DEPTH:
            raise DhkdError(f"cannot parse {what} {source}: nested deeper than {MAX_DEPTH} levels")
        key = id(node)
        if key in sizes:
            if sizes[key] < 0:
                raise DhkdError(f"cannot parse {what} {source}: an alias refers to itself")
            return sizes[key]
        sizes[key] = -1
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child, depth + 1) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            _check_keys(node, source, what)
            total += sum(size(k, depth + 1) + size(v, depth + 1) for k, v in node.value)
        sizes[key] = min(total, MAX_NODES + 1)
        if total > MAX_NODES:
            raise DhkdError(
                f"{what} {source} expands (through YAML aliases) to more than {MAX_NODES} values; write the values out"
            )
        return sizes[key]

    size(root, 0)


def _check_keys(node: yaml.MappingNode, source: str, what: str):
    """A key given twice in one mapping is refused: YAML loaders keep one of them silently."""
    seen: dict[tuple, int] = {}
    for key, _ in node.value:
        if isinstance(key, yaml.ScalarNode):
            name = (key.tag, key.value)
            if name in seen:
                raise DhkdError(
                    f"{what} {source} sets {key.value!r} twice"
                    f" (lines {seen[name]} and {key.start_mark.line + 1}); keep one"
                )
            seen[name] = key.start_mark.line + 1
