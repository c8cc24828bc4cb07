"""Compressors: objects with state (update statistics on a schedule, apply in the hot path)."""
