"""Who may reach what: the Host names the server answers to, the browser origins trusted with
stored data, and the two keys.

Plain functions of the settings and a request's headers, with no Flask in them:
``security.py`` applies them to the HTTP routes, the websocket server to its handshakes.

- **Host** (DNS rebinding): a page on ``evil.example`` that re-points its name at 127.0.0.1
  reaches the server with ``Host: evil.example``. IP addresses, localhost names, this machine's
  name, names that only resolve locally (``.local``, ``.internal``), ``host`` and
  ``allowed_hosts`` are answered; anything else is refused.
- **Origin**: any page may generate (Kobold Lite calls a local backend from its own site), but
  only the server's own page, localhost pages and ``cors_origins`` may read or change stored
  characters and conversations. A request without ``Origin`` is not from a browser page (curl,
  SillyTavern's server, the Horde worker) or is same-origin, and is not an origin question.
- **Keys**: ``api_key`` for every route (probes aside when ``open_probes``), ``admin_key`` (when
  set) for destructive and admin routes, where the plain key is refused.
"""

from __future__ import annotations

import fnmatch
import hmac
import ipaddress
import socket
from dataclasses import dataclass
from enum import Enum
from urllib.parse import urlsplit

from ..settings import Settings

#: Names no public DNS answers for: a rebinding page cannot have one.
LOCAL_SUFFIXES = (".localhost", ".local", ".internal")
#: Origins of desktop app shells that load their page from the local machine (Tauri on macOS/Linux;
#: on Windows it is http://tauri.localhost, a localhost name already).
APP_ORIGINS = ("tauri://localhost",)
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


class Role(Enum):
    """What a request's key lets it do."""

    USER = "user"
    ADMIN = "admin"


def split_host(host: str) -> tuple[str, int | None]:
    """``Host`` header -> (lower-case name without brackets or trailing dot, port or None)."""
    host = host.strip().lower()
    port: str | None = None
    if host.startswith("["):  # [::1]:5000
        name, _, rest = host[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else None
    elif host.count(":") == 1:
        name, port = host.split(":")
    else:  # a name, or a bare IPv6 address
        name = host
    try:
        number = int(port) if port else None
    except ValueError:
        number = -1  # not a port: never equal to a real one
    return name.rstrip("."), number


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]").split("%", 1)[0])
        return True
    except ValueError:
        return False


def is_loopback(host: str) -> bool:
    """Whether listening on ``host`` (a bind address) keeps the server to this machine."""
    name = host.strip().strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _is_local_name(name: str) -> bool:
    return name.endswith(LOCAL_SUFFIXES) or is_loopback(name)


@dataclass(frozen=True)
class AccessPolicy:
    """The settings' access rules, built once per app."""

    host_names: frozenset[str]
    host_suffixes: tuple[str, ...]
    any_host: bool
    origins: tuple[str, ...]
    any_origin: bool
    api_key: str
    admin_key: str

    @classmethod
    def from_settings(cls, settings: Settings, machine_name: str | None = None) -> "AccessPolicy":
        machine = (machine_name if machine_name is not None else socket.gethostname()).lower().rstrip(".")
        names = {machine, machine.split(".", 1)[0], settings.host.strip("[]").lower()}
        entries = [entry.lower().rstrip(".") for entry in settings.allowed_host_list]
        names.update(entry.lstrip(".") for entry in entries if entry != "*")
        suffixes = tuple(entry for entry in entries if entry.startswith("."))
        origins = tuple(origin.lower().rstrip("/") for origin in settings.cors_origin_list)
        return cls(host_names=frozenset(name for name in names if name), host_suffixes=suffixes,
                   any_host="*" in entries, origins=tuple(o for o in origins if o != "*"),
                   any_origin="*" in origins, api_key=settings.api_key, admin_key=settings.admin_key)

    # --- Host ------------------------------------------------------------------------
    def host_allowed(self, host_header: str | None) -> bool:
        """Whether a request with this ``Host`` header is answered (none at all: HTTP/1.0, yes)."""
        if not host_header or self.any_host:
            return True
        name, _ = split_host(host_header)
        return (is_ip(name) or _is_local_name(name) or name in self.host_names
                or name.endswith(self.host_suffixes))

    # --- Origin ----------------------------------------------------------------------
    def origin_trusted(self, origin: str | None, host_header: str | None) -> bool:
        """Whether a request from a page at ``origin`` may read or change stored data."""
        if origin is None or self.any_origin:
            return True
        origin = origin.strip().lower().rstrip("/")
        if any(origin == allowed or fnmatch.fnmatchcase(origin, allowed) for allowed in self.origins):
            return True
        if origin in APP_ORIGINS:
            return True
        try:
            parts = urlsplit(origin)
            origin_port = parts.port
        except ValueError:
            return False
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return False  # "null" (sandboxed frames, file: pages), extensions, other schemes
        if is_loopback(parts.hostname):  # localhost, *.localhost, 127.0.0.0/8, ::1
            return True
        return self._same_origin(parts.scheme, parts.hostname, origin_port, host_header)

    @staticmethod
    def _same_origin(scheme: str, name: str, port: int | None, host_header: str | None) -> bool:
        """The page came from this server (the name the browser used for it, any scheme: behind a
        TLS proxy the page is https and the proxy's request plain)."""
        if not host_header:
            return False
        host_name, host_port = split_host(host_header)
        default = _DEFAULT_PORTS.get(scheme)  # no port in either: the scheme's own
        return name.strip("[]") == host_name and (port or default) == (host_port or default)

    # --- keys ------------------------------------------------------------------------
    def role(self, authorization: str | None, x_api_key: str | None) -> Role | None:
        """What the key a request carries allows; None when a key is required and it is wrong.

        With no ``api_key`` every caller is a user; with no ``admin_key`` every user may administer
        (see :meth:`may_administer`)."""
        supplied = _supplied_key(authorization, x_api_key)
        if self.admin_key and _same(supplied, self.admin_key):
            return Role.ADMIN
        if not self.api_key or _same(supplied, self.api_key):
            return Role.USER
        return None

    def may_administer(self, role: Role | None) -> bool:
        return role is Role.ADMIN or (role is Role.USER and not self.admin_key)


def _supplied_key(authorization: str | None, x_api_key: str | None) -> str:
    """The key in ``Authorization: Bearer <key>``, else in ``X-Api-Key``."""
    scheme, _, token = (authorization or "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else (x_api_key or "")


def _same(supplied: str, key: str) -> bool:
    return hmac.compare_digest(supplied.encode(), key.encode())


def has_key(authorization: str | None, x_api_key: str | None) -> bool:
    return bool(_supplied_key(authorization, x_api_key))


def exposure_warnings(settings: Settings) -> list[str]:
    """What the server should say loudly at start-up about who can reach private data."""
    warnings = []
    if not is_loopback(settings.host) and not settings.api_key:
        warnings.append(
            f"Listening on {settings.host}:{settings.port}, beyond this machine, with NO API KEY: anyone who can "
            "reach this port can generate, and read, change and delete every stored conversation and character. "
            "Set an api_key (--api-key, KOBOLD_API_API_KEY or settings.json), or listen on 127.0.0.1.")
    if "*" in settings.cors_origin_list:
        warnings.append("cors_origins is '*': every web page opened in a browser that reaches this server may read "
                        "and delete the stored conversations and characters. Name the origins you trust instead.")
    if "*" in settings.allowed_host_list:
        warnings.append("allowed_hosts is '*': the Host check is off, so a DNS-rebinding web page can reach the API "
                        "from a browser on this machine.")
    return warnings
