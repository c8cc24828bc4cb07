"""Numerics: pure functions on tensors and floats (no nn.Module, no state)."""
