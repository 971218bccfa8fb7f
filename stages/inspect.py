"""``dhkd-pipe inspect``: what a logit store holds and what of it is damaged."""

from __future__ import annotations

import json
from dataclasses import dataclass

from dhkd_pipe.config import InspectConfig
from dhkd_pipe.terminal_text import escaped


@dataclass
class Inspection:
    """A store's summary (its ``metadata`` entry lists how its metadata differs from a logit
    store's, its ``damaged`` entry what is damaged) and, for such a store, the error line naming the fix."""

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
    """Opens ``cfg.store``, compares its metadata with a logit store's and checks every written
    object: present, and its CRC32C checksums right (``cfg.no_checksums``: present and of a sound
    size; ``cfg.quick``: no object, only which units are done)."""
    from dhkd_pipe.store.inspection import inspection

    summary, error = inspection(cfg.store, checksums=not cfg.no_checksums, objects=not cfg.quick)
    return Inspection(summary, error)
