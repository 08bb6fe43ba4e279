"""``~/.databrickscfg`` profiles, read as the Databricks CLI and SDKs read them.

:func:`read_profile` knows the file format and how a profile is chosen; the
loader decides whether the file is read at all and names the sources in its
messages.
"""

from __future__ import annotations

import configparser
from pathlib import Path
from typing import Final

DEFAULT_PROFILE: Final = "DEFAULT"
#: The keys lakeproxy takes from a profile.
PROFILE_KEYS: Final = (
    "host", "client_id", "client_secret", "token", "auth_type", "azure_client_id",
    "azure_client_secret", "azure_tenant_id", "databricks_cli_path", "oidc_token_filepath",
)
_SETTINGS: Final = "__settings__"


class ProfileError(Exception):
    """The file cannot be read, or the named profile is not in it (``missing``).

    The message never quotes the file's lines (they may hold a secret). A
    missing profile's message fits after the source that named the profile.
    """

    def __init__(self, message: str, *, missing: bool = False) -> None:
        super().__init__(message)
        self.missing = missing


def read_profile(path: Path, profile: str | None) -> tuple[str, dict[str, str]] | None:
    """The chosen profile's name and its non-empty :data:`PROFILE_KEYS` values.

    With ``profile`` None the file's ``[__settings__] default_profile`` is used,
    else ``[DEFAULT]``; None is returned when neither exists.

    Raises:
        ProfileError: the file is not a readable INI file, or the profile is missing.
    """
    parser = configparser.ConfigParser(interpolation=None, default_section="\x00none")
    try:
        with path.open(encoding="utf-8") as f:
            parser.read_file(f)
    except (configparser.Error, UnicodeDecodeError, OSError) as exc:
        # Never echo the exception: a parse error quotes the line, which may hold a secret.
        line = getattr(exc, "lineno", None)
        at = f" (line {line})" if line is not None else ""
        raise ProfileError(f"{path}: cannot read it as a .databrickscfg INI file{at}") from None

    if profile is None:
        default = ""
        if parser.has_section(_SETTINGS):
            default = parser.get(_SETTINGS, "default_profile", fallback="").strip()
        if default:
            profile = default
        elif parser.has_section(DEFAULT_PROFILE):
            profile = DEFAULT_PROFILE
        else:
            return None
    if not parser.has_section(profile) or profile == _SETTINGS:
        names = ", ".join(s for s in parser.sections() if s != _SETTINGS) or "none"
        raise ProfileError(
            f"profile [{profile}] not found in {path} (profiles: {names})", missing=True
        )
    values = {}
    for key in PROFILE_KEYS:
        value = parser.get(profile, key, fallback="").strip()
        if value:
            values[key] = value
    return profile, values
