"""Data sets and views: the data sets (``datasets``: the protocols and ``load_data``; the in-memory
ones and their files in ``in_memory`` and ``readers``) and image folders, view plans (the recorded
crop and flip), the DALI renderer, stage 1's decode-once, and the loaders that replay a store's
epochs.

May import: ``store``, ``models``, ``kernels`` and the base modules. Never ``methods``,
``training``, ``stages`` or ``cli``.
"""
