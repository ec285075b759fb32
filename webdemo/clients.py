"""Who a request comes from, which names it may reach the server by, and how fast it may guess.

- `client_address`: the peer's address, or the one a trusted reverse proxy (Hugging Face
  Spaces' front end, `--forwarded-allow-ips`) names in X-Forwarded-For; never a value a client
  can choose for itself when it connects directly. Throttling and per-client shares key on it.
- `HostAllowList`: the names the server answers to (`--allowed-hosts`). Any other Host or
  X-Forwarded-Host gets 400, so a page on another site cannot reach a local server through DNS
  rebinding, and no foreign name is copied into Gradio's `/config` root.
- `GuessThrottle`: failed logins and API keys cost the guesser time: a few free tries per
  address, then a lock that doubles with every further failure (429 with Retry-After, and the
  right credential is refused too while locked, so a lock tells a guesser nothing), plus one
  shared budget for every address that has failed lately, so that many addresses guessing
  together are slowed as well. An address with no recent failure is never held up by others.
"""
from __future__ import annotations

import ipaddress
import math
import os
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import psutil

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARD_BINDS = ("0.0.0.0", "::", "")
SHARE_DOMAIN = ".gradio.live"
SPACES_DOMAIN = ".hf.space"

FREE_FAILURES = 5  # wrong credentials an address may send before it is locked
LOCK_BASE_S = 1.0  # the first lock; each further failure doubles it
LOCK_MAX_S = 900.0
FORGET_AFTER_S = 900.0  # failures older than this are forgiven
SHARED_BUDGET = 30  # checks that addresses with recent failures may make together...
SHARED_REFILL_PER_S = 0.5  # ...refilled at this rate (30 a minute)
MAX_TRACKED = 100_000  # addresses remembered; the oldest are forgotten first


def client_address(peer: Optional[str], forwarded_for: Optional[str], trusted: tuple[str, ...]) -> str:
    """The client's address: the peer's, unless the peer is a trusted proxy; then the nearest
    address in X-Forwarded-For that is not itself a trusted proxy (a client can put anything at
    the start of that header, only the proxies' own additions at its end count)."""
    peer = peer or "unknown"
    if not forwarded_for or not _trusted(peer, trusted):
        return peer
    for hop in reversed([part.strip() for part in forwarded_for.split(",")]):
        try:
            address = str(ipaddress.ip_address(hop))
        except ValueError:
            return peer  # a malformed hop: trust nothing further
        if not _trusted(address, trusted):
            return address
    return peer


def _trusted(address: str, trusted: tuple[str, ...]) -> bool:
    return "*" in trusted or address in trusted


def host_name(value: str) -> str:
    """A Host header's name without its port, lower case ('[::1]:80' -> '::1')."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


@dataclass
class HostAllowList:
    """Names as given: 'example.com' exactly, '.example.com' for it and its subdomains, '*' for
    any. The loopback names are always allowed: a browser sends them only for a page it was
    pointed at on this machine, never for another site's page (DNS rebinding carries the
    attacker's own name)."""

    names: tuple[str, ...]

    def allows(self, host: str) -> bool:
        name = host_name(host)
        if not name or name in LOOPBACK_NAMES or "*" in self.names:
            return bool(name)
        return any(name == entry or (entry.startswith(".") and (name.endswith(entry) or name == entry[1:]))
                   for entry in (entry.lower() for entry in self.names))

    def add(self, name: str) -> None:
        if name and name not in self.names:
            self.names = (*self.names, name)


def default_allowed_hosts(bind: str, share: bool, space_host: Optional[str]) -> tuple[str, ...]:
    """The names people reach this server by: the bound address; on a wildcard bind also this
    machine's name and every address of its interfaces; the share link's domain with --share;
    the Space's own host on Hugging Face Spaces."""
    names = [bind] if bind not in WILDCARD_BINDS else [socket.gethostname(), socket.getfqdn(), *_interface_addresses()]
    if share:
        names.append(SHARE_DOMAIN)
    if space_host:
        names += [space_host, SPACES_DOMAIN]
    return tuple(dict.fromkeys(name.lower() for name in names if name))


def _interface_addresses() -> Iterable[str]:
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family in (socket.AF_INET, socket.AF_INET6):
                yield address.address.split("%")[0]


def space_host() -> Optional[str]:
    """The Space's own host name (Hugging Face sets SPACE_HOST), or None."""
    return os.environ.get("SPACE_HOST") or None


@dataclass
class _Failures:
    count: int = 0
    last_s: float = 0.0
    locked_until_s: float = 0.0


class GuessThrottle:
    """Failed credential checks per address (see the module's docstring). Used from the event
    loop only, so it needs no lock. free_failures: wrong credentials before the first lock;
    clock: seconds, monotonic."""

    def __init__(self, free_failures: int = FREE_FAILURES, clock: Callable[[], float] = time.monotonic):
        self.free_failures, self.clock = free_failures, clock
        self.failures: OrderedDict[str, _Failures] = OrderedDict()
        self.shared_tokens = float(SHARED_BUDGET)
        self.shared_at_s = clock()

    def wait_s(self, address: str) -> float:
        """0 if `address` may have a credential checked now (and it is counted), else the seconds
        to wait before trying again."""
        now = self.clock()
        record = self._record(address, now)
        if record is None:
            return 0.0
        if record.locked_until_s > now:
            return record.locked_until_s - now
        self.shared_tokens = min(SHARED_BUDGET, self.shared_tokens + (now - self.shared_at_s) * SHARED_REFILL_PER_S)
        self.shared_at_s = now
        if self.shared_tokens < 1:
            return (1 - self.shared_tokens) / SHARED_REFILL_PER_S
        self.shared_tokens -= 1
        return 0.0

    def failed(self, address: str) -> None:
        now = self.clock()
        record = self._record(address, now) or _Failures()
        record.count += 1
        record.last_s = now
        if record.count > self.free_failures:
            record.locked_until_s = now + min(LOCK_MAX_S, LOCK_BASE_S * 2 ** min(30, record.count - self.free_failures - 1))
        self.failures[address] = record
        self.failures.move_to_end(address)
        while len(self.failures) > MAX_TRACKED:
            self.failures.popitem(last=False)

    def succeeded(self, address: str) -> None:
        self.failures.pop(address, None)

    def _record(self, address: str, now: float) -> Optional[_Failures]:
        record = self.failures.get(address)
        if record is not None and now - record.last_s > FORGET_AFTER_S and record.locked_until_s <= now:
            del self.failures[address]
            return None
        return record


def retry_after(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))
