"""The logit store (stage 1's output, stage 2's input): its schema and codecs, reading, writing,
auditing and locking, on a local disk or on object storage through Zarr's store API.

Modules: ``layout`` (the one place that knows the schema), ``codecs``, ``objects`` (Zarr store
access), ``chunk_objects``, ``bounds`` (size limits on what is read), ``reader`` (``LogitCache``),
``writer``, ``audit``, ``lock``.

May import: the base modules (``errors``, ``options``, ``console``, ``terminal_text``,
``processes``, ...). Never ``data``, ``methods``, ``training``, ``stages`` or ``cli``.
"""
