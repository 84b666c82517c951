"""VRRP state machine, RFC 5798 section 6.4 (and RFC 3768 for v2), sans-I/O.

One :class:`VrrpMachine` per virtual router (VRID and address family).  It owns
no sockets, tasks or clocks: the driver feeds it events together with the
current time ``now`` (float seconds, any monotonic origin) and performs the
actions it returns, in order:

* :class:`SendAdvert` - encode the advert (``packet.encode(advert, src, dst)``)
  and send it from the primary address to the VRRP group or unicast peers,
  IP TTL / hop limit 255.
* :class:`AddVips` / :class:`RemoveVips` - add / remove the virtual addresses.
* :class:`SendGratuitous` - a gratuitous ARP (IPv4) or unsolicited NA (IPv6)
  burst for the addresses (repeats and spacing are the driver's business).
* :class:`Notify` - a state change, for notify scripts, logs and metrics.

The driver must call :meth:`VrrpMachine.on_timer` at or after
:meth:`VrrpMachine.next_deadline` (calling it early is harmless).

Differences from the bare RFC, on purpose:

* ``preempt_delay`` (keepalived semantics): for ``preempt_delay`` seconds after
  the machine enters Backup (start, interface up, or losing mastership), a
  higher-priority backup does not preempt a lower-priority master; it takes
  over when the delay ends if that master is still advertising.
* Interface down moves to Initialize (VIPs removed, nothing sent); interface up
  runs the RFC Startup event again.
* Track weights (:meth:`VrrpMachine.set_priority_offset`) change the effective
  priority, clamped to 1..254; the address owner (priority 255) stays 255.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum

from .packet import ADVERT_TYPE, AUTH_DATA_LEN, AUTH_NONE, AUTH_SIMPLE, Address, Advert

__all__ = [
    "OWNER_PRIORITY",
    "State",
    "Config",
    "SendAdvert",
    "AddVips",
    "RemoveVips",
    "SendGratuitous",
    "Notify",
    "Action",
    "Counters",
    "VrrpMachine",
    "REJECT_REASONS",
]

OWNER_PRIORITY = 255

#: Reasons under which :attr:`Counters.rejected` counts dropped adverts.
REJECT_REASONS = (
    "not_running",  # received while in Initialize
    "loopback",  # our own advert (source is our primary address)
    "vrid",  # another virtual router
    "version",  # VRRP version differs from ours
    "family",  # source or addresses of the other address family
    "type",  # not an advertisement
    "auth",  # v2 authentication type or data differ
    "interval",  # v2 advert interval differs from ours
    "addresses",  # v2 address list differs (and sender is not the owner)
)


class State(str, Enum):
    INITIALIZE = "initialize"
    BACKUP = "backup"
    MASTER = "master"


def _addr(x: Address | str) -> Address:
    return ipaddress.ip_address(x)


@dataclass(frozen=True, kw_only=True)
class Config:
    """Configuration of one virtual router.

    ``priority`` 255 means we own the virtual addresses.  ``interval_cs`` is the
    advertisement interval in centiseconds (v2: whole seconds only).
    ``primary_address`` is our own address on the interface (source of our
    adverts, and the tie-break at equal priority).  ``auth_type``/``auth_data``
    are for v2 only (0 none, 1 simple text of at most 8 bytes).
    """

    vrid: int
    priority: int
    primary_address: Address
    vips: tuple[Address, ...]
    interval_cs: int = 100
    version: int = 3
    preempt: bool = True
    preempt_delay: float = 0.0
    accept_mode: bool = False
    auth_type: int = AUTH_NONE
    auth_data: bytes = b""

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "primary_address", _addr(self.primary_address))
        set_(self, "vips", tuple(_addr(v) for v in self.vips))
        set_(self, "auth_data", bytes(self.auth_data))
        if not 1 <= self.vrid <= 255:
            raise ValueError(f"vrid {self.vrid} not in 1..255")
        if not 1 <= self.priority <= 255:
            raise ValueError(f"priority {self.priority} not in 1..255")
        if self.version not in (2, 3):
            raise ValueError(f"version {self.version} not 2 or 3")
        if self.version == 2:
            if self.interval_cs % 100 or not 1 <= self.interval_cs // 100 <= 255:
                raise ValueError("v2 interval must be 1..255 whole seconds")
            if self.family != 4:
                raise ValueError("VRRPv2 is IPv4 only")
            if self.auth_type not in (AUTH_NONE, AUTH_SIMPLE):
                raise ValueError(f"auth type {self.auth_type} not supported")
            if len(self.auth_data) > AUTH_DATA_LEN:
                raise ValueError(f"auth data longer than {AUTH_DATA_LEN} bytes")
        else:
            if not 1 <= self.interval_cs <= 0x0FFF:
                raise ValueError("v3 interval must be 1..4095 centiseconds")
            if self.auth_type != AUTH_NONE or self.auth_data:
                raise ValueError("VRRPv3 has no authentication")
        if not 1 <= len(self.vips) <= 255:
            raise ValueError("1..255 virtual addresses required")
        if any(v.version != self.family for v in self.vips):
            raise ValueError("virtual addresses and primary address of different families")
        if self.preempt_delay < 0:
            raise ValueError("preempt_delay < 0")

    @property
    def family(self) -> int:
        return self.primary_address.version

    @property
    def is_owner(self) -> bool:
        return self.priority == OWNER_PRIORITY


# ---- actions -------------------------------------------------------------


@dataclass(frozen=True)
class SendAdvert:
    advert: Advert


@dataclass(frozen=True)
class AddVips:
    vips: tuple[Address, ...]


@dataclass(frozen=True)
class RemoveVips:
    vips: tuple[Address, ...]


@dataclass(frozen=True)
class SendGratuitous:
    vips: tuple[Address, ...]


@dataclass(frozen=True)
class Notify:
    old_state: State
    new_state: State
    reason: str


Action = SendAdvert | AddVips | RemoveVips | SendGratuitous | Notify


@dataclass
class Counters:
    adverts_received: int = 0  # every on_advert call
    adverts_accepted: int = 0  # passed validation and processed by the state machine
    adverts_sent: int = 0
    priority_zero_received: int = 0
    priority_zero_sent: int = 0
    addr_mismatch: int = 0  # v3 adverts whose address list differs (processed anyway)
    rejected: Counter[str] = field(default_factory=Counter)  # by REJECT_REASONS
    transitions: Counter[tuple[State, State]] = field(default_factory=Counter)


class VrrpMachine:
    """RFC 5798 state machine for one virtual router. See the module docstring."""

    def __init__(self, config: Config, *, interface_up: bool = True) -> None:
        self.config = config
        self.counters = Counters()
        self.state = State.INITIALIZE
        #: who we believe is master (our primary address when we are); None if unknown
        self.master_address: Address | None = None
        #: priority in the last advert accepted from the master (ours when master)
        self.master_priority: int | None = None
        #: Master_Adver_Interval in centiseconds (learned from the master in v3)
        self.master_adver_interval_cs = config.interval_cs
        self.priority_offset = 0
        self._interface_up = interface_up
        self._started = False
        self._adver_deadline: float | None = None
        self._down_deadline: float | None = None
        self._down_reason = "master_down"
        self._preempt_hold_until = float("-inf")

    # ---- derived values --------------------------------------------------

    @property
    def priority(self) -> int:
        """Effective priority: configured priority plus track offset, clamped."""
        if self.config.is_owner:
            return OWNER_PRIORITY
        return max(1, min(254, self.config.priority + self.priority_offset))

    @property
    def started(self) -> bool:
        return self._started

    @property
    def interface_up(self) -> bool:
        return self._interface_up

    @property
    def advert_interval(self) -> float:
        """Our Advertisement_Interval in seconds."""
        return self.config.interval_cs / 100.0

    @property
    def skew_time(self) -> float:
        """Skew_Time in seconds (v3: RFC 5798 formula; v2: RFC 3768 formula)."""
        if self.config.version == 2:
            return (256 - self.priority) / 256.0
        return (256 - self.priority) * self.master_adver_interval_cs / 256.0 / 100.0

    @property
    def master_down_interval(self) -> float:
        """Master_Down_Interval in seconds."""
        return 3 * self.master_adver_interval_cs / 100.0 + self.skew_time

    def next_deadline(self) -> float | None:
        """When :meth:`on_timer` must next be called; None when no timer runs."""
        if self.state is State.MASTER:
            return self._adver_deadline
        if self.state is State.BACKUP:
            return self._down_deadline
        return None

    # ---- events ------------------------------------------------------------

    def start(self, now: float) -> list[Action]:
        """Administrative start (RFC Startup event, once the interface is up)."""
        if self._started:
            return []
        self._started = True
        if not self._interface_up:
            return []
        return self._startup(now, "start")

    def shutdown(self, now: float) -> list[Action]:
        """Administrative stop: a master sends priority 0 and drops the VIPs."""
        self._started = False
        if self.state is State.MASTER:
            actions: list[Action] = [self._send(0)]
            actions.append(RemoveVips(self.config.vips))
            return actions + self._to(State.INITIALIZE, "shutdown")
        if self.state is State.BACKUP:
            return self._to(State.INITIALIZE, "shutdown")
        return []

    def on_interface(self, up: bool, now: float) -> list[Action]:
        """The interface (link or tracked fault) went up or down."""
        if up == self._interface_up:
            return []
        self._interface_up = up
        if not up:
            actions: list[Action] = []
            if self.state is State.MASTER:
                actions.append(RemoveVips(self.config.vips))
            if self.state is not State.INITIALIZE:
                actions += self._to(State.INITIALIZE, "interface_down")
            return actions
        if self._started and self.state is State.INITIALIZE:
            return self._startup(now, "interface_up")
        return []

    def set_priority_offset(self, delta: int, now: float) -> list[Action]:
        """Set the total track weight added to the configured priority.

        A master advertises the new priority at once; a backup uses it for
        Skew_Time and preemption from now on.
        """
        old = self.priority
        self.priority_offset = int(delta)
        if self.priority == old or self.state is not State.MASTER:
            return []
        self.master_priority = self.priority
        self._adver_deadline = now + self.advert_interval
        return [self._send(self.priority)]

    def on_timer(self, now: float) -> list[Action]:
        """Run the timers that are due at ``now``."""
        if self.state is State.MASTER:
            dl = self._adver_deadline
            if dl is None or now < dl:
                return []
            nxt = dl + self.advert_interval
            self._adver_deadline = nxt if nxt > now else now + self.advert_interval
            return [self._send(self.priority)]
        if self.state is State.BACKUP:
            dl = self._down_deadline
            if dl is None or now < dl:
                return []
            return self._become_master(now, self._down_reason)
        return []

    def on_advert(self, advert: Advert, src_ip: Address | str, now: float) -> list[Action]:
        """A decoded advert arrived from ``src_ip`` (the IP source address)."""
        c = self.counters
        c.adverts_received += 1
        cfg = self.config
        try:
            src = _addr(src_ip)
        except ValueError:
            return self._reject("family")
        if self.state is State.INITIALIZE:
            return self._reject("not_running")
        if src == cfg.primary_address:
            return self._reject("loopback")
        if advert.vrid != cfg.vrid:
            return self._reject("vrid")
        if advert.version != cfg.version:
            return self._reject("version")
        if src.version != cfg.family or any(a.version != cfg.family for a in advert.addresses):
            return self._reject("family")
        if advert.type != ADVERT_TYPE:
            return self._reject("type")
        if cfg.version == 2:
            if advert.auth_type != cfg.auth_type or (
                cfg.auth_type == AUTH_SIMPLE
                and advert.auth_data.ljust(AUTH_DATA_LEN, b"\0")
                != cfg.auth_data.ljust(AUTH_DATA_LEN, b"\0")
            ):
                return self._reject("auth")
            if advert.interval_cs != cfg.interval_cs:
                return self._reject("interval")
        if set(advert.addresses) != set(cfg.vips):
            if cfg.version == 2 and advert.priority != OWNER_PRIORITY:
                return self._reject("addresses")  # RFC 3768 7.1: MUST drop
            c.addr_mismatch += 1  # RFC 5798 7.1: MAY check, SHOULD log
        c.adverts_accepted += 1
        if advert.priority == 0:
            c.priority_zero_received += 1

        if self.state is State.BACKUP:
            return self._backup_advert(advert, src, now)
        return self._master_advert(advert, src, now)

    # ---- internals ---------------------------------------------------------

    def _reject(self, reason: str) -> list[Action]:
        self.counters.rejected[reason] += 1
        return []

    def _backup_advert(self, adv: Advert, src: Address, now: float) -> list[Action]:
        if adv.priority == 0:
            # the master is leaving: take over after Skew_Time unless a better backup does
            self.master_address = None
            self.master_priority = None
            self._set_down(now + self.skew_time, "master_released")
            return []
        preempt = self.config.preempt or self.priority == OWNER_PRIORITY
        lower = adv.priority < self.priority
        if preempt and lower and now >= self._preempt_hold_until:
            return []  # discard: we take over when Master_Down_Timer fires
        self.master_address = src
        self.master_priority = adv.priority
        self.master_adver_interval_cs = adv.interval_cs  # v2: equal by validation
        deadline = now + self.master_down_interval
        if preempt and lower and self._preempt_hold_until < deadline:
            # preempt_delay running: keep the lower master until the delay ends
            self._set_down(self._preempt_hold_until, "preempt")
        else:
            self._set_down(deadline, "master_down")
        return []

    def _master_advert(self, adv: Advert, src: Address, now: float) -> list[Action]:
        if adv.priority == 0:
            self._adver_deadline = now + self.advert_interval
            return [self._send(self.priority)]
        mine = self.priority
        if adv.priority > mine:
            reason = "higher_priority"
        elif adv.priority == mine and int(src) > int(self.config.primary_address):
            reason = "tie_break"
        else:
            return []  # discard
        self._adver_deadline = None
        actions: list[Action] = [RemoveVips(self.config.vips)]
        actions += self._enter_backup(now, reason)
        self.master_address = src
        self.master_priority = adv.priority
        self.master_adver_interval_cs = adv.interval_cs
        self._set_down(now + self.master_down_interval, "master_down")
        return actions

    def _set_down(self, deadline: float, reason: str) -> None:
        self._down_deadline = deadline
        self._down_reason = reason

    def _startup(self, now: float, reason: str) -> list[Action]:
        if self.config.is_owner:
            return self._become_master(now, reason)
        actions = self._enter_backup(now, reason)
        self._set_down(now + self.master_down_interval, "master_down")
        return actions

    def _enter_backup(self, now: float, reason: str) -> list[Action]:
        self.master_address = None
        self.master_priority = None
        self.master_adver_interval_cs = self.config.interval_cs
        self._preempt_hold_until = now + self.config.preempt_delay
        return self._to(State.BACKUP, reason)

    def _become_master(self, now: float, reason: str) -> list[Action]:
        self._down_deadline = None
        self.master_address = self.config.primary_address
        self.master_priority = self.priority
        self.master_adver_interval_cs = self.config.interval_cs
        self._adver_deadline = now + self.advert_interval
        actions: list[Action] = [
            AddVips(self.config.vips),
            self._send(self.priority),
            SendGratuitous(self.config.vips),
        ]
        return actions + self._to(State.MASTER, reason)

    def _to(self, new: State, reason: str) -> list[Action]:
        old = self.state
        self.state = new
        if new is State.INITIALIZE:
            self._adver_deadline = None
            self._down_deadline = None
            self.master_address = None
            self.master_priority = None
        self.counters.transitions[(old, new)] += 1
        return [Notify(old, new, reason)]

    def _send(self, priority: int) -> SendAdvert:
        cfg = self.config
        self.counters.adverts_sent += 1
        if priority == 0:
            self.counters.priority_zero_sent += 1
        return SendAdvert(
            Advert(
                version=cfg.version,
                vrid=cfg.vrid,
                priority=priority,
                interval_cs=cfg.interval_cs,
                addresses=list(cfg.vips),
                auth_type=cfg.auth_type if cfg.version == 2 else AUTH_NONE,
                auth_data=cfg.auth_data if cfg.version == 2 else b"",
            )
        )
