"""Reading one setting from the environment: text, whole numbers, durations, https URLs, shares and Dataverse names,
and the ``.env`` file beneath them. Every bad value is a one-line ``ConfigError`` naming the variable; what the
settings are, and their defaults, is ``config.py``'s.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from .errors import ConfigError

__all__ = ["EnvReader", "is_loopback", "parse_duration", "read_dotenv"]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(text: str) -> float:
    """'15m' → 900.0; '30s', '1h', '250ms', or a bare number of seconds."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError("expected a duration such as 30s, 15m or 1h")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_dotenv(path: Path) -> dict[str, str]:
    """A minimal .env reader: KEY=VALUE lines, # comments, optional quotes. The environment wins over it."""
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :]
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{path}:{lineno}: expected KEY=VALUE")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


class EnvReader:
    """One value of the environment at a time, checked: each method returns the value (or the default when the
    variable is unset or blank) or raises a one-line ``ConfigError`` naming the variable."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def text(self, name: str) -> str | None:
        value = self._env.get(name)
        if value is None or value.strip() == "":
            return None
        return value.strip()

    def integer(self, name: str, default: int, *, minimum: int, maximum: int | None = None) -> int:
        raw = self.text(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name}: expected a whole number, got {raw!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
            raise ConfigError(f"{name}: must be {bound}, got {value}")
        return value

    def duration(self, name: str, default: float) -> float:
        raw = self.text(name)
        if raw is None:
            return default
        try:
            value = parse_duration(raw)
        except ValueError as err:
            raise ConfigError(f"{name}: {err}, got {raw!r}") from None
        if value <= 0:
            raise ConfigError(f"{name}: must be longer than zero, got {raw!r}")
        return value

    def url(self, name: str) -> str | None:
        """An https URL; plain http only to a loopback host (tests, local fakes), where nothing crosses a network.
        A typo'd ``http://`` elsewhere would send the client secret and bearer tokens in clear text."""
        raw = self.text(name)
        if raw is None:
            return None
        if not re.match(r"^https?://[^/\s]+", raw):
            raise ConfigError(f"{name}: expected an https URL, got {raw!r}")
        parts = urlsplit(raw)
        if parts.scheme != "https" and not is_loopback(parts.hostname or ""):
            raise ConfigError(f"{name}: must be https:// (plain http is allowed only to a loopback host), got {raw!r}")
        return raw.rstrip("/") if name == "HLF_DYNAMICS_URL" else raw

    def share(self, name: str, default: float) -> float:
        """A share such as ``10%`` or ``0.1``."""
        raw = self.text(name)
        if raw is None:
            return default
        try:
            value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
        except ValueError:
            raise ConfigError(f"{name}: expected a share such as 10% or 0.1, got {raw!r}") from None
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{name}: must be between 0% and 100%, got {raw!r}")
        return value

    def identifier(self, name: str, default: str) -> str:
        raw = self.text(name) or default
        # These names end up in URLs and OData $select: keep them to what Dataverse allows.
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", raw):
            raise ConfigError(f"{name}: expected a Dataverse logical name (letters, digits, _), got {raw!r}")
        return raw

    def secret_file(self, name: str, path: str) -> str:
        """The contents of the file ``name`` points at, stripped: it must exist and not be empty."""
        try:
            value = Path(path).read_text().strip()
        except OSError as err:
            raise ConfigError(f"{name}: cannot read {path!r} ({err.strerror})") from None
        if not value:
            raise ConfigError(f"{name}: {path!r} is empty")
        return value
