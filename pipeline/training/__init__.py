"""Training: a run's set-up (``run``), the engine (the loop) and what ends an epoch and a run
(``epoch_end``), the training state and its checkpoint, the run folder and its lock, the
accelerator, the non-finite guard, several students in one pass and the sweeps built on it
(``sweep``), an Optuna study's search space, samplers and storage (``study``), gradient alignment
and the exported student.

May import: ``config``, ``methods``, ``data``, ``store``, ``models``, ``kernels`` and the base
modules. Never ``stages``, ``benchmarks`` or ``cli``.
"""
