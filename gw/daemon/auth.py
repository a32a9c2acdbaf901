"""The API's bearer token: where it comes from and how a request's header is checked.

- ``api.token_file`` set: the token is that file's content (surrounding whitespace ignored).
- Oakestra mode without one: the gateway creates ``api-token`` (mode 0600) in the store's
  directory on its first start and reuses it afterwards; the cluster gets it in the ready
  callback.
- Standalone without one: no token (the daemon warns when the API listens beyond loopback).
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import stat
from pathlib import Path

from ..core.config import Settings
from ..core.errors import ConfigError
from ..store.files import fsync_dir

log = logging.getLogger(__name__)

GENERATED_NAME = "api-token"
MIN_LENGTH = 16
MAX_LENGTH = 4096


def generated_path(settings: Settings) -> Path:
    return Path(settings.store.path).parent / GENERATED_NAME


def read_token(path: str | Path, field: str = "api.token_file") -> str:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_LENGTH + 1)
            mode = os.fstat(f.fileno()).st_mode
    except OSError as exc:
        raise ConfigError(f"{field}: cannot read {path}: {exc.strerror}", field=field) from None
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"{field}: {path} must hold printable ASCII", field=field) from None
    if len(raw) > MAX_LENGTH or not token.isprintable() or " " in token:
        raise ConfigError(f"{field}: {path} must hold one printable token without spaces, at "
                          f"most {MAX_LENGTH} characters", field=field)
    if len(token) < MIN_LENGTH:
        raise ConfigError(f"{field}: the token in {path} is shorter than {MIN_LENGTH} "
                          "characters", field=field)
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s is readable by group or others (mode %o); chmod 600 it",
                    path, stat.S_IMODE(mode))
    return token


def create_token(path: Path) -> str:
    """Write a fresh random token, mode 0600, durably; an existing file is never replaced."""
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, (token + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        fsync_dir(path.parent)
    except OSError:
        pass
    return token


def daemon_token(settings: Settings) -> str | None:
    """The token the daemon requires, creating one in Oakestra mode when none is configured."""
    if settings.api.token_file:
        return read_token(settings.api.token_file)
    if settings.standalone:
        return None
    path = generated_path(settings)
    if path.exists():
        return read_token(path, "api.token_file (generated)")
    try:
        token = create_token(path)
    except FileExistsError:  # created meanwhile: use that one
        return read_token(path, "api.token_file (generated)")
    except OSError as exc:
        raise ConfigError(f"api.token_file is not set and {path} cannot be created: "
                          f"{exc.strerror}", field="api.token_file") from None
    log.info("created the API token %s (mode 0600)", path)
    return token


def client_token(settings: Settings | None, token_file: str | None = None) -> str | None:
    """The token a client (the CLI) sends: an explicit file, else the configured one, else the
    generated one when it exists and is readable; None without any."""
    if token_file:
        return read_token(token_file, "--token-file")
    if settings is None:
        return None
    if settings.api.token_file:
        return read_token(settings.api.token_file)
    path = generated_path(settings)
    if path.exists():
        return read_token(path, "api.token_file (generated)")
    return None


def bearer_matches(header: str | None, token: str) -> bool:
    """Whether an ``Authorization`` header carries `token`; constant time in the token."""
    if not header:
        return False
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    given = value.strip().encode("utf-8", "surrogateescape")
    return hmac.compare_digest(given, token.encode("utf-8"))
