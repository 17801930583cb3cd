"""Measuring tools run by `make benchmarks` and `make verify`; not imported by the notebooks."""
