"""Drop-in use of scale_fast inside other training libraries, one module each.

Importing this package imports nothing heavy: each integration module imports its library only
when it is used (``scale_fast.integrations.open_clip.patch()`` imports open_clip).
"""
