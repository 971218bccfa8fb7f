"""Run configuration: plain data read from YAML, overridden from the command line.

Each option is declared once, in this package, as a field with its flag, help and choices in its metadata
(``options.option``); the CLI's options are generated from these fields, YAML recipes use their
names, and a method's options come from the method classes' own fields (``methods``). The names a
setting may take are declared by the module that owns them, in torch-free modules: codecs
(``codecs.CODECS``), aux heads (``models.aux_heads.AUX_HEADS``), loss backends and kd losses
(``loss_names``), data sets (``data.DATA_SETS``). The precisions are declared in ``config.common``: they are
Accelerate's ``mixed_precision`` values, and both stages pass them to ``training.accelerator.make_accelerator``.
The package imports no torch: the CLI's help and usage errors cost nothing.

Modules: ``common`` (what several commands share), ``training`` (``TrainConfig``), ``tuning``
(``tune``'s own options), ``commands``
(stage 1 and the commands that do not train), ``benchmarks`` (``bench``'s commands), ``recipes``
(a config built from defaults, a YAML recipe and the command line, each value checked). The
names below are the package's, so ``from dhkd_pipe.config import TrainConfig`` is the one door.
"""

from dhkd_pipe.config.benchmarks import (
    BENCH_SIZES,
    BENCHMARKS,
    AccuracyBenchConfig,
    AllBenchConfig,
    CacheBenchConfig,
    DistillBenchConfig,
    ScaleBenchConfig,
    StoreBenchConfig,
    SweepBenchConfig,
)
from dhkd_pipe.config.commands import (
    CacheConfig,
    EvalConfig,
    ExportConfig,
    InspectConfig,
    QuickstartConfig,
    ReportConfig,
    StoreLockOptions,
    VerifyCacheConfig,
)
from dhkd_pipe.config.common import EXPORT_FORMATS, PRECISIONS, WEIGHTS_HELP, data_help, missing_data
from dhkd_pipe.config.recipes import build_config, config_defaults, read_recipe
from dhkd_pipe.config.training import MethodOptions, PassMemory, RunStart, StudentSeeds, SweepOptions, TrainConfig
from dhkd_pipe.config.tuning import TuneOptions

__all__ = [
    "BENCH_SIZES",
    "BENCHMARKS",
    "EXPORT_FORMATS",
    "PRECISIONS",
    "WEIGHTS_HELP",
    "AccuracyBenchConfig",
    "AllBenchConfig",
    "CacheBenchConfig",
    "CacheConfig",
    "DistillBenchConfig",
    "EvalConfig",
    "ExportConfig",
    "InspectConfig",
    "MethodOptions",
    "PassMemory",
    "QuickstartConfig",
    "ReportConfig",
    "RunStart",
    "ScaleBenchConfig",
    "StoreBenchConfig",
    "StoreLockOptions",
    "StudentSeeds",
    "SweepBenchConfig",
    "SweepOptions",
    "TrainConfig",
    "TuneOptions",
    "VerifyCacheConfig",
    "build_config",
    "config_defaults",
    "data_help",
    "missing_data",
    "read_recipe",
]
