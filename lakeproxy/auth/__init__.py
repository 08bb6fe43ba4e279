"""Databricks credentials: the provider seam, the API client and the cache."""

from lakeproxy.auth.cache import (
    CachedCredentials,
    CredentialObserver,
    CredentialUnavailable,
    RequestObserver,
)
from lakeproxy.auth.databricks import DatabricksApi, check_host, parse_rfc3339
from lakeproxy.auth.provider import Credential, CredentialProvider

__all__ = [
    "CachedCredentials",
    "Credential",
    "CredentialObserver",
    "CredentialProvider",
    "CredentialUnavailable",
    "DatabricksApi",
    "RequestObserver",
    "check_host",
    "parse_rfc3339",
]
