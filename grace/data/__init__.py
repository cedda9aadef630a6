"""Image sets: records, the on-disk format and its validation, importers, synthetic sets, versions.

The bottom layer: above it, it imports only ``errors``, ``constants`` and ``atomic_io``.
"""
