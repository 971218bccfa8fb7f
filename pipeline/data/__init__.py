"""Data sets and views: in-memory data sets and image folders, view plans (the recorded crop and
flip), the DALI renderer, stage 1's decode-once, and the loaders that replay a store's epochs.

May import: ``store``, ``models``, ``kernels`` and the base modules. Never ``methods``,
``training``, ``stages`` or ``cli``.
"""
