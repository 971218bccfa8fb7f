"""The logit store (stage 1's output, stage 2's input): its schema and codecs, reading, writing,
auditing and locking, on a local disk or on object storage through Zarr's store API.

Modules: ``layout`` (the arrays, their chunks and write units), ``schema`` (the metadata schema and
its validation), ``codecs``, ``objects`` (Zarr store access), ``targets`` (where an output may be
written), ``chunk_objects``, ``bounds`` (size limits on what is read), ``reader`` (``LogitCache``:
opening a store and its streaming reads), ``inspection`` (what ``inspect`` shows), ``writer``,
``audit``, ``lock``.

May import: the base modules (``errors``, ``options``, ``console``, ``terminal_text``,
``processes``, ...). Never ``data``, ``methods``, ``training``, ``stages`` or ``cli``.
"""
