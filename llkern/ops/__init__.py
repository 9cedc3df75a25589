"""Custom ops: one file per op (wrapper, fake registration, autograd)."""
