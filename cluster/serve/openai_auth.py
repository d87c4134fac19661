"""API keys for the HTTP API: OpenAI-style ``Authorization: Bearer <key>``.

``AuthSettings`` is the ``auth:`` block of ``deploy/app.yaml`` (``AppConfig.auth``). Keys come
from the environment variable ``api_keys_env`` (default ``TINYSERVE_API_KEYS``, comma or
whitespace separated) and/or the file ``api_keys_file`` (one key per line, ``#`` comments),
both read in the ingress replica's process: never from the YAML itself. ``enabled: false``
turns the check off for local use only: the ingress then refuses to start unless Serve's HTTP
proxy binds a loopback address.

``ApiKeys.check(header)`` answers whether an ``Authorization`` header value carries a known
key. NOTE: every configured key is compared, each through ``hmac.compare_digest`` over SHA-256
digests (equal lengths), so the time taken does not depend on where a guess first differs nor
on which key matched.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

# Paths anyone may reach without a key: probes (load balancers, KubeRay) carry none.
PUBLIC_PATHS = frozenset({"/health"})
MIN_KEY_CHARS = 16


class AuthSettings(BaseModel):
    """How the ingress authenticates clients (``auth:`` in ``deploy/app.yaml``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = Field(
        default=True,
        description="Require an API key on every route but /health. False is for local use "
        "only: the ingress then refuses to start unless the HTTP proxy binds loopback.",
    )
    api_keys_env: str = Field(
        default="TINYSERVE_API_KEYS",
        description="Environment variable (in the ingress replica's process) holding the keys, "
        "comma or whitespace separated.",
    )
    api_keys_file: str | None = Field(
        default=None,
        description="File with one key per line ('#' comments, '~' expanded), read on the "
        "ingress replica's node. Never put keys in app.yaml itself.",
    )


@dataclass(frozen=True, slots=True)
class ApiKeys:
    """The SHA-256 digests of the accepted keys (the keys themselves are not kept)."""

    digests: tuple[bytes, ...]

    @classmethod
    def from_keys(cls, keys: list[str]) -> ApiKeys:
        short = [k for k in keys if len(k) < MIN_KEY_CHARS]
        if short:
            raise ValueError(f"API keys must be at least {MIN_KEY_CHARS} characters")
        return cls(tuple(hashlib.sha256(k.encode()).digest() for k in dict.fromkeys(keys)))

    def check(self, authorization: str | None) -> bool:
        """True when ``authorization`` is ``Bearer <one of the keys>``."""
        if not authorization:
            return False
        scheme, _, key = authorization.strip().partition(" ")
        digest = hashlib.sha256(key.strip().encode("utf-8", "surrogatepass")).digest()
        ok = False
        for known in self.digests:
            ok |= hmac.compare_digest(digest, known)
        return ok and scheme.lower() == "bearer"


def parse_keys(text: str) -> list[str]:
    """Keys from an env value or a key file: separated by commas, whitespace or lines;
    ``#`` starts a comment."""
    keys: list[str] = []
    for line in text.splitlines():
        line = line.split("#", 1)[0]
        keys.extend(k for k in line.replace(",", " ").split() if k)
    return keys


def load_keys(settings: AuthSettings, environ: dict[str, str] | None = None) -> ApiKeys | None:
    """The keys to accept, or None when auth is off. Raises ValueError when auth is on and
    no key is configured (fail closed: an API without keys is never served by accident)."""
    if not settings.enabled:
        return None
    env = os.environ if environ is None else environ
    keys = parse_keys(env.get(settings.api_keys_env, ""))
    if settings.api_keys_file:
        path = Path(settings.api_keys_file).expanduser()
        try:
            keys += parse_keys(path.read_text())
        except FileNotFoundError as exc:
            if not keys:  # NOTE: keys from the env suffice; a file named but absent then is fine
                raise ValueError(f"auth.api_keys_file {str(path)!r} does not exist") from exc
        except OSError as exc:
            raise ValueError(f"auth.api_keys_file {str(path)!r} unreadable: {exc}") from exc
    if not keys:
        raise ValueError(
            f"auth is on but no API key is configured: set ${settings.api_keys_env} (in the "
            "environment of `ray start` on the ingress nodes) or auth.api_keys_file; for "
            "local use only, auth.enabled: false (the HTTP proxy must then bind 127.0.0.1)"
        )
    return ApiKeys.from_keys(keys)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_local_only(settings: AuthSettings, http_host: str | None) -> None:
    """With auth off, the proxy must bind loopback; raises ValueError otherwise."""
    if not settings.enabled and not is_loopback(http_host or ""):
        raise ValueError(
            f"auth.enabled is false but the HTTP proxy binds {http_host!r}: without API keys "
            "the app only serves on loopback (http_options.host: 127.0.0.1)"
        )
