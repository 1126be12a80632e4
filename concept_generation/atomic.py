"""Crash-safe file writes (the implementation lives in :mod:`vocalign_hf.atomic`, shared with the trainer)."""

from vocalign_hf.atomic import atomic_write_json, atomic_write_text

__all__ = ["atomic_write_text", "atomic_write_json"]
