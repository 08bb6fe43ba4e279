"""Integration tests (a package, so that its conftest and the one in tests/ differ for mypy)."""
