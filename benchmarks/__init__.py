"""Benchmarks for lakeproxy: the splice alone and side by side with PgBouncer.

See benchmarks/README.md for how to run them and how to read the results.
"""
