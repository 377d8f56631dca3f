"""Benchmarks of mtl_kernels' ops (see harness.py); run them all with `python -m benchmarks`."""
