"""lakeproxy: a local Postgres endpoint for Databricks Lakebase."""

__version__ = "0.1.0"
