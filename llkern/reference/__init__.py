"""Pure-PyTorch references of every llkern op (tests and benchmarks compare against these)."""
