"""What ``inspect`` shows of a store: its summary, how its metadata differs from the schema, and its
missing or damaged objects, with the one error line that names the fix.

It sits above ``reader`` (it opens the store with ``LogitCache.open``); the reader never imports it.
"""

from __future__ import annotations

from dhkd_pipe.store.audit import damage
from dhkd_pipe.store.reader import LogitCache
from dhkd_pipe.store.schema import metadata_error


def inspection(location: str, checksums: bool = True, objects: bool = True) -> tuple[dict, str | None]:
    """What ``inspect`` shows of the store at ``location``: its summary with ``metadata`` (how its
    metadata differs from a logit store's, one line each) and ``damaged`` (its objects that are
    missing or damaged, ``audit.damage``; None where the metadata differs, as the objects are read
    through it, or where ``objects`` is unset), and the one error line naming the fix, or None for a
    sound store. ``objects=False`` (``--quick``) lists the done flags alone: its cost does not grow
    with the store's objects, and neither their presence nor their bytes are counted."""
    cache = LogitCache.open(location, schema=False)
    # --quick lists the done flags alone; else the one listing the summary and the audit share
    sizes = cache.objects.sizes() if objects else cache.objects.sizes("done/")
    summary = cache.summary(sizes, counted=objects)
    # where the data is and how views become pixels: attributes stage 1 writes
    summary["data"] = cache.attrs.get("data_spec")
    summary["preprocessing"] = cache.attrs.get("preprocessing")
    problems = cache.metadata_problems
    summary["metadata"] = problems
    if problems or not objects:
        summary["damaged"] = None
        return summary, f"error: {metadata_error(cache.path, cache.attrs, problems)}" if problems else None
    damaged = damage(cache, checksums=checksums, sizes=sizes)
    summary["damaged"] = damaged
    if not damaged:
        return summary, None
    more = f" and {len(damaged) - 1} more" if len(damaged) > 1 else ""
    return summary, f"error: store {cache.path} is damaged: {damaged[0]}{more}; {cache.repair_hint()}"
