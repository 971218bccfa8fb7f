"""``dhkd-pipe inspect``: what a logit store holds and what of it is damaged."""

from __future__ import annotations

import json
from dataclasses import dataclass

from dhkd_pipe.config import InspectConfig
from dhkd_pipe.terminal_text import escaped


@dataclass
class Inspection:
    """A store's summary (its ``damaged`` entry lists what is damaged) and, for a damaged store,
    the error line naming the fix."""

    summary: dict
    error: str | None = None

    def lines(self) -> list[str]:
        """The summary as aligned ``key  value`` lines for a terminal."""
        width = max(len(k) for k in self.summary)
        return [
            f"{key:<{width}}  {json.dumps(value) if isinstance(value, (dict, list)) else escaped(value)}"
            for key, value in self.summary.items()
        ]


def inspect_store(cfg: InspectConfig) -> Inspection:
    """Opens ``cfg.store`` and checks every written object (present, and with ``cfg.quick`` unset,
    its CRC32C checksums right)."""
    from dhkd_pipe.store.audit import damage
    from dhkd_pipe.store.reader import LogitCache

    cache = LogitCache.open(cfg.store)
    summary = cache.summary()
    # where the data is and how views become pixels: attributes stage 1 writes
    summary["data"] = cache.attrs.get("data_spec")
    summary["preprocessing"] = cache.attrs.get("preprocessing")
    damaged = damage(cache, checksums=not cfg.quick)
    summary["damaged"] = damaged
    if not damaged:
        return Inspection(summary)
    more = f" and {len(damaged) - 1} more" if len(damaged) > 1 else ""
    return Inspection(summary, f"error: store {cache.path} is damaged: {damaged[0]}{more}; {cache.repair_hint()}")
