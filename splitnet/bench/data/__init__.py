"""Datasets the benchmarks build from what ships with Python and scikit-learn (no downloads)."""
