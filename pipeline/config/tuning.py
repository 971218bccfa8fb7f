"""``dhkd-pipe tune``'s own options (``TuneOptions``): the study, its sampler and pruner, its
storage. The trials' training options are ``TrainConfig``'s, as ``distill`` takes them. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass

from dhkd_pipe.errors import DhkdError
from dhkd_pipe.options import option

SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "halving", "hyperband", "threshold", "none")


@dataclass
class TuneOptions:
    """How ``tune`` searches: what it samples from (``space``), how many trials and how many per pass."""

    space: str | None = option(
        None,
        "YAML search space: option: {type: float|int|categorical, low, high, log, step, choices}, for the "
        "options that sweep (see distill --help).",
        required=True,
    )
    trials: int = option(16, "Trials the study is to have ended (complete or pruned), over every tune process.")
    per_pass: int = option(4, "Trials trained at a time, in one pass over the store.")
    sampler: str = option("tpe", "Optuna sampler (grid: every option categorical or int).", choices=SAMPLERS)
    study_seed: int = option(0, "Seed of the sampler.")
    pruner: str = option(
        "median",
        "Optuna pruner, fed each trial's validation top-1 at every epoch's end (halving: successive halving).",
        choices=PRUNERS,
    )
    prune_below: float | None = option(None, "--pruner threshold: prune a trial whose top-1 (%) is below this.")
    prune_after: int = option(1, "Epochs a trial trains before the pruner may stop it.")
    startup_trials: int = option(4, "--pruner median: trials that end before it prunes any.")
    storage: str | None = option(
        None,
        "Optuna storage URL (e.g. postgresql://host/db, for tune processes on several machines); default: "
        "sqlite in --out (study.db).",
    )
    study_name: str = option("dhkd", "The study's name in the storage.")
    heartbeat: int = option(
        60,
        "Seconds between a running trial's heartbeats; a trial silent for twice as long (its process killed) "
        "is marked failed and re-queued, and the tune that takes it resumes its run folder.",
    )

    def validate(self) -> "TuneOptions":
        for name in ("trials", "per_pass", "heartbeat"):
            if getattr(self, name) < 1:
                raise DhkdError(f"bad {name} {getattr(self, name)}: must be at least 1")
        if self.prune_after < 0 or self.startup_trials < 0:
            raise DhkdError("prune_after and startup_trials must not be negative")
        if (self.pruner == "threshold") != (self.prune_below is not None):
            raise DhkdError("--pruner threshold takes --prune-below TOP1 (and only it does)")
        return self
