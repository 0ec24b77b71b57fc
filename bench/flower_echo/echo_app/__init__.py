"""Benchmark App: parameters there and back through Flower."""
