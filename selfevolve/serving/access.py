"""Who may reach `selfevolve serve` and what it may touch: the API key and the loopback
rule, adapter updates, the directory adapters load from, and the POSTs a browser page could
forge (docs/serving.md states the model)."""

from __future__ import annotations

import hmac
import ipaddress
import os
from pathlib import Path
from urllib.parse import urlsplit

from starlette.requests import Request

from selfevolve.errors import UserError


def authorized(api_key: str | None, header: str | None) -> bool:
    """Whether an `Authorization` header carries the key (always, when there is none). Constant
    time: the time a wrong key takes says nothing about the right one."""
    return not api_key or hmac.compare_digest((header or "").encode(), f"Bearer {api_key}".encode())


def exposure(cfg) -> tuple[str | None, bool]:
    """(the API key, whether adapter updates are accepted), from a ServeConfig's host, api_key,
    insecure and allow_adapter_updates: a server reachable beyond
    loopback needs a key (or insecure=true); updates are on for loopback or keyed servers
    unless `allow_adapter_updates` says otherwise."""
    key = cfg.api_key or os.environ.get("SELFEVOLVE_API_KEY")
    if not (loopback(cfg.host) or key or cfg.insecure):
        raise UserError(f"host={cfg.host} exposes the server to the network without an api_key: anyone who "
                        "reaches it could use it and change its model; set api_key= (or SELFEVOLVE_API_KEY), "
                        "or insecure=true")
    updates = cfg.allow_adapter_updates if cfg.allow_adapter_updates is not None else loopback(cfg.host) or bool(key)
    return key, updates


def confined_root(adapter_root: str | None) -> Path | None:
    """The directory adapter loads are confined to (resolved), or None."""
    root = Path(adapter_root).resolve() if adapter_root else None
    if root and not root.is_dir():
        raise UserError(f"adapter_root={adapter_root} is not a directory")
    return root


def foreign_request(request: Request, listening: str) -> str | None:
    """Why a POST must be refused as not coming from a real API client, or None: its body is
    not declared JSON (a browser's cross-site form or text/plain POST needs no CORS
    preflight), its Origin is another site's, or — on a loopback server — its Host is not a
    loopback name (DNS rebinding: a page whose name resolves to 127.0.0.1)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        return f"Content-Type must be application/json (got {kind or 'none'})"
    host = request.headers.get("host", "")
    name = urlsplit("//" + host).hostname or ""
    if loopback(listening) and not loopback(name):
        return f"Host {host!r} is not a loopback name; this server listens on {listening} only"
    origin = request.headers.get("origin")
    if origin is not None and urlsplit(origin).netloc.lower() != host.lower():
        return f"cross-origin request from {origin} refused"
    return None


def loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only.

    >>> loopback("127.0.0.1"), loopback("localhost"), loopback("::1"), loopback("0.0.0.0")
    (True, True, True, False)
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False
