"""The errors of the gateway's core. Each knows the HTTP status it maps to, so the API has one
error handler and the CLI one way to print them."""

from __future__ import annotations


class GatewayError(Exception):
    """Base class. `code` is a stable machine-readable word, `field` names the offending input."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field

    def to_dict(self) -> dict:
        body = {"error": self.code, "message": self.message}
        if self.field is not None:
            body["field"] = self.field
        return body


def one_line(exc: GatewayError) -> str:
    """The message, prefixed by the field it names unless the message names it already."""
    field = getattr(exc, "field", None)
    if field and field not in exc.message:
        return f"{field}: {exc.message}"
    return exc.message


class InvalidInput(GatewayError):
    """The request (or a config value) is malformed or not allowed. Nothing was changed."""

    status = 400
    code = "invalid"


class Conflict(GatewayError):
    """The exposed port is already taken by another target."""

    status = 409
    code = "conflict"


class NotFound(GatewayError):
    status = 404
    code = "not_found"


class Unavailable(GatewayError):
    """A dependency (kernel, disk) refused the change; store and kernel are as they were."""

    status = 503
    code = "unavailable"


class KernelRefused(Unavailable):
    """nftables refused a transaction. The message carries nft's own words."""

    code = "kernel_refused"


class StoreUnavailable(Unavailable):
    """The store could not write (disk full, read-only, I/O error). The kernel was not touched."""

    code = "store_unavailable"


class Busy(Unavailable):
    """As many changes as may wait at once are waiting already (for the store or the kernel):
    this one was not tried, nothing was changed. Retry."""

    code = "busy"
    headers = {"Retry-After": "1"}


class StoreCorrupt(GatewayError):
    """The store's files cannot be read back. Raised at open; the files are left untouched."""

    code = "store_corrupt"


class StoreLocked(GatewayError):
    """Another process holds the store."""

    code = "store_locked"


class ConfigError(GatewayError):
    """A configuration value is invalid; `field` is the dotted key (e.g. ``api.port``)."""

    code = "config_error"
