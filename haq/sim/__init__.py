"""Trace-driven simulator: the runtime's policy objects replayed against a hardware profile."""
