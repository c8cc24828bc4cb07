"""Integration: autograd functions, model wrapping, capture, DDP hooks, forward quantizers."""
