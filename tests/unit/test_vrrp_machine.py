"""VRRP state machine (RFC 5798 6.4) driven by a fake clock."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from scapy.layers.inet import IP
from scapy.utils import rdpcap

from l4lb.vrrp.machine import (
    AddVips,
    Config,
    Notify,
    RemoveVips,
    SendAdvert,
    SendGratuitous,
    State,
    VrrpMachine,
)
from l4lb.vrrp.packet import VRRP_MCAST_V4, Advert, decode, encode

A4 = ipaddress.IPv4Address
ME = A4("10.0.0.2")
PEER_HI = A4("10.0.0.3")  # higher address than ME
PEER_LO = A4("10.0.0.1")  # lower address than ME
VIP = A4("10.0.0.100")
VIPS = (VIP,)

INIT, BACKUP, MASTER = State.INITIALIZE, State.BACKUP, State.MASTER


def cfg(priority: int = 100, **kw) -> Config:
    kw.setdefault("vrid", 7)
    kw.setdefault("primary_address", ME)
    kw.setdefault("vips", VIPS)
    return Config(priority=priority, **kw)


def adv(priority: int, interval_cs: int = 100, **kw) -> Advert:
    kw.setdefault("version", 3)
    kw.setdefault("vrid", 7)
    kw.setdefault("addresses", list(VIPS))
    return Advert(priority=priority, interval_cs=interval_cs, **kw)


def kinds(actions) -> list[type]:
    return [type(a) for a in actions]


def notify(actions) -> Notify:
    (n,) = [a for a in actions if isinstance(a, Notify)]
    return n


def sent(actions) -> list[Advert]:
    return [a.advert for a in actions if isinstance(a, SendAdvert)]


def mdi(priority: int, interval_cs: int = 100) -> float:
    return 3 * interval_cs / 100 + (256 - priority) * interval_cs / 256 / 100


def skew(priority: int, interval_cs: int = 100) -> float:
    return (256 - priority) * interval_cs / 256 / 100


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> float:
        self.t += dt
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock()


def backup(clock: Clock, priority: int = 100, **kw) -> VrrpMachine:
    m = VrrpMachine(cfg(priority, **kw))
    m.start(clock())
    assert m.state is BACKUP
    return m


def master(clock: Clock, priority: int = 100, **kw) -> VrrpMachine:
    m = backup(clock, priority, **kw)
    clock.t = m.next_deadline()
    m.on_timer(clock())
    assert m.state is MASTER
    return m


# ---- Initialize --------------------------------------------------------------


def test_init_to_backup(clock):
    m = VrrpMachine(cfg(100))
    assert m.state is INIT and m.next_deadline() is None
    acts = m.start(clock())
    assert acts == [Notify(INIT, BACKUP, "start")]
    assert m.state is BACKUP and m.master_address is None
    assert m.next_deadline() == pytest.approx(clock() + mdi(100))
    assert m.master_down_interval == pytest.approx(3.609375)
    assert m.skew_time == pytest.approx(0.609375)
    assert m.start(clock()) == []  # idempotent
    assert m.counters.transitions[(INIT, BACKUP)] == 1


def test_owner_init_to_master(clock):
    m = VrrpMachine(cfg(255, primary_address=VIP))
    acts = m.start(clock())
    assert kinds(acts) == [AddVips, SendAdvert, SendGratuitous, Notify]
    assert acts[0] == AddVips(VIPS) and acts[2] == SendGratuitous(VIPS)
    (a,) = sent(acts)
    assert (a.version, a.vrid, a.priority, a.interval_cs, a.addresses) == (3, 7, 255, 100, [VIP])
    assert notify(acts) == Notify(INIT, MASTER, "start")
    assert m.state is MASTER and m.master_address == VIP
    assert m.next_deadline() == pytest.approx(clock() + 1.0)


# ---- Backup ------------------------------------------------------------------


def test_backup_to_master_on_master_down(clock):
    m = backup(clock)
    dl = m.next_deadline()
    assert m.on_timer(dl - 0.001) == []
    assert m.state is BACKUP
    acts = m.on_timer(dl)
    assert kinds(acts) == [AddVips, SendAdvert, SendGratuitous, Notify]
    assert notify(acts) == Notify(BACKUP, MASTER, "master_down")
    assert sent(acts)[0].priority == 100
    assert m.master_address == ME
    assert m.next_deadline() == pytest.approx(dl + 1.0)


def test_backup_accepts_higher_priority_and_resets_timer(clock):
    m = backup(clock)
    for _ in range(10):
        t = clock.advance(1.0)
        assert m.on_advert(adv(150), PEER_LO, t) == []
        assert m.on_timer(t) == []
        assert m.next_deadline() == pytest.approx(t + mdi(100))
    assert m.state is BACKUP
    assert m.master_address == PEER_LO and m.master_priority == 150
    assert m.counters.adverts_accepted == 10
    # master goes silent: take over Master_Down_Interval after its last advert
    acts = m.on_timer(clock() + mdi(100))
    assert notify(acts).new_state is MASTER


def test_backup_priority_zero_takes_over_after_skew(clock):
    m = backup(clock)
    m.on_advert(adv(150), PEER_LO, clock.advance(0.5))
    t = clock.advance(0.5)
    assert m.on_advert(adv(0), PEER_LO, t) == []
    assert m.counters.priority_zero_received == 1
    assert m.master_address is None
    assert m.next_deadline() == pytest.approx(t + skew(100))
    assert m.on_timer(t + skew(100) - 0.001) == []
    acts = m.on_timer(t + skew(100))
    assert notify(acts) == Notify(BACKUP, MASTER, "master_released")


def test_priority_zero_lets_the_better_backup_win(clock):
    """Both backups arm Skew_Time; the higher priority one fires first and its
    advert resets the other's timer."""
    hi = backup(clock, 200, primary_address=PEER_HI)
    lo = backup(clock, 100)
    t = clock.advance(1.0)
    for m in (hi, lo):
        m.on_advert(adv(254), A4("10.0.0.9"), t)
        m.on_advert(adv(0), A4("10.0.0.9"), t)
    assert hi.next_deadline() < lo.next_deadline()
    acts = hi.on_timer(hi.next_deadline())
    assert hi.state is MASTER
    lo.on_advert(sent(acts)[0], PEER_HI, hi.next_deadline() - 1.0)
    assert lo.state is BACKUP and lo.master_address == PEER_HI


def test_backup_preempt_true_ignores_lower_priority(clock):
    m = backup(clock, 150)
    start = clock()
    dl = m.next_deadline()
    for _ in range(3):
        m.on_advert(adv(100), PEER_LO, clock.advance(1.0))
        assert m.next_deadline() == dl  # not reset
    assert m.master_address is None
    acts = m.on_timer(dl)
    assert notify(acts) == Notify(BACKUP, MASTER, "master_down")
    assert dl == pytest.approx(start + mdi(150))


def test_backup_preempt_false_keeps_lower_priority_master(clock):
    m = backup(clock, 150, preempt=False)
    for _ in range(20):
        t = clock.advance(1.0)
        m.on_advert(adv(100), PEER_LO, t)
        assert m.on_timer(t) == []
        assert m.next_deadline() == pytest.approx(t + mdi(150))
    assert m.state is BACKUP and m.master_address == PEER_LO


def test_backup_equal_priority_resets_timer_even_with_lower_address(clock):
    m = backup(clock, 100)
    t = clock.advance(1.0)
    m.on_advert(adv(100), PEER_LO, t)
    assert m.next_deadline() == pytest.approx(t + mdi(100))


def test_preempt_delay(clock):
    m = backup(clock, 150, preempt_delay=10.0)
    start = clock()
    acts = []
    while not acts:
        t = clock.advance(1.0)
        m.on_advert(adv(100), PEER_LO, t)  # lower-priority master keeps advertising
        assert m.master_address == PEER_LO
        acts = m.on_timer(m.next_deadline()) if m.next_deadline() <= t + 1.0 else []
        if not acts:
            assert m.state is BACKUP
    assert notify(acts) == Notify(BACKUP, MASTER, "preempt")
    assert m.next_deadline() - 1.0 == pytest.approx(start + 10.0)


def test_preempt_delay_dead_master_still_times_out(clock):
    m = backup(clock, 150, preempt_delay=30.0)
    t = clock.advance(1.0)
    m.on_advert(adv(100), PEER_LO, t)
    assert m.next_deadline() == pytest.approx(t + mdi(150))
    acts = m.on_timer(m.next_deadline())
    assert notify(acts).reason == "master_down"


def test_preempt_delay_restarts_on_becoming_backup(clock):
    m = master(clock, 150, preempt_delay=5.0)
    t = clock.advance(0.3)
    m.on_advert(adv(200), PEER_LO, t)  # loses mastership
    assert m.state is BACKUP
    # the higher master dies, a lower one appears: wait until t + 5
    t2 = clock.advance(1.0)
    m.on_advert(adv(100), PEER_HI, t2)
    assert m.next_deadline() == pytest.approx(t2 + mdi(150))
    t3 = clock.advance(3.0)
    m.on_advert(adv(100), PEER_HI, t3)
    assert m.next_deadline() == pytest.approx(t + 5.0)


def test_preempt_delay_after_delay_is_plain_preempt(clock):
    m = backup(clock, 150, preempt_delay=2.0)
    t = clock.advance(1.0)
    m.on_advert(adv(200), PEER_LO, t)  # a better master keeps us backup past the delay
    t = clock.advance(1.0)
    m.on_advert(adv(200), PEER_LO, t)
    dl = m.next_deadline()
    clock.advance(1.5)
    m.on_advert(adv(100), PEER_LO, clock())  # it lowered its priority: ignored now
    assert m.next_deadline() == dl


# ---- Master ------------------------------------------------------------------


def test_master_sends_adverts_on_timer(clock):
    m = master(clock)
    first = m.next_deadline()
    acts = m.on_timer(first - 0.01)
    assert acts == []
    for _ in range(5):
        acts = m.on_timer(m.next_deadline())
        assert kinds(acts) == [SendAdvert]
    assert m.next_deadline() == pytest.approx(first + 5.0)
    # a driver late by several intervals gets one advert, not a burst
    late = m.next_deadline() + 3.5
    assert len(m.on_timer(late)) == 1
    assert m.next_deadline() == pytest.approx(late + 1.0)


def test_master_to_backup_on_higher_priority(clock):
    m = master(clock, 100)
    t = clock.advance(0.2)
    acts = m.on_advert(adv(200, interval_cs=50), PEER_LO, t)
    assert acts == [RemoveVips(VIPS), Notify(MASTER, BACKUP, "higher_priority")]
    assert m.state is BACKUP and m.master_address == PEER_LO and m.master_priority == 200
    assert m.master_adver_interval_cs == 50
    assert m.next_deadline() == pytest.approx(t + mdi(100, 50))


def test_master_discards_lower_priority(clock):
    m = master(clock, 100)
    dl = m.next_deadline()
    assert m.on_advert(adv(99), PEER_HI, clock.advance(0.1)) == []
    assert m.state is MASTER and m.next_deadline() == dl


def test_tie_break_higher_address_wins(clock):
    m = master(clock, 100)
    acts = m.on_advert(adv(100), PEER_HI, clock.advance(0.1))
    assert notify(acts) == Notify(MASTER, BACKUP, "tie_break")
    assert m.master_address == PEER_HI


def test_tie_break_lower_address_loses(clock):
    m = master(clock, 100)
    dl = m.next_deadline()
    assert m.on_advert(adv(100), PEER_LO, clock.advance(0.1)) == []
    assert m.state is MASTER and m.next_deadline() == dl


def test_master_priority_zero_sends_advert_at_once(clock):
    m = master(clock, 100)
    t = clock.advance(0.4)
    acts = m.on_advert(adv(0), PEER_LO, t)
    assert kinds(acts) == [SendAdvert] and sent(acts)[0].priority == 100
    assert m.state is MASTER
    assert m.next_deadline() == pytest.approx(t + 1.0)


# ---- shutdown, interface -------------------------------------------------------


def test_shutdown_from_master(clock):
    m = master(clock)
    acts = m.shutdown(clock.advance(0.5))
    assert kinds(acts) == [SendAdvert, RemoveVips, Notify]
    assert sent(acts)[0].priority == 0
    assert notify(acts) == Notify(MASTER, INIT, "shutdown")
    assert m.state is INIT and m.next_deadline() is None and m.master_address is None
    assert m.counters.priority_zero_sent == 1
    assert m.shutdown(clock()) == []
    # and it can start again
    assert notify(m.start(clock.advance(1))) == Notify(INIT, BACKUP, "start")


def test_shutdown_from_backup(clock):
    m = backup(clock)
    assert m.shutdown(clock()) == [Notify(BACKUP, INIT, "shutdown")]
    assert m.next_deadline() is None


def test_interface_down_up_master(clock):
    m = master(clock)
    acts = m.on_interface(False, clock.advance(0.1))
    assert acts == [RemoveVips(VIPS), Notify(MASTER, INIT, "interface_down")]
    assert m.next_deadline() is None
    assert m.on_interface(False, clock()) == []
    assert m.on_advert(adv(200), PEER_LO, clock()) == []
    assert m.counters.rejected["not_running"] == 1
    assert m.on_timer(clock.advance(100)) == []
    acts = m.on_interface(True, clock.advance(1))
    assert acts == [Notify(INIT, BACKUP, "interface_up")]
    assert m.next_deadline() == pytest.approx(clock() + mdi(100))


def test_interface_down_up_owner(clock):
    m = VrrpMachine(cfg(255))
    m.start(clock())
    assert m.on_interface(False, clock())[-1] == Notify(MASTER, INIT, "interface_down")
    acts = m.on_interface(True, clock.advance(1))
    assert kinds(acts) == [AddVips, SendAdvert, SendGratuitous, Notify]
    assert m.state is MASTER


def test_interface_down_in_backup_and_start_while_down(clock):
    m = backup(clock)
    assert m.on_interface(False, clock()) == [Notify(BACKUP, INIT, "interface_down")]
    m2 = VrrpMachine(cfg(100), interface_up=False)
    assert m2.start(clock()) == [] and m2.state is INIT
    assert m2.on_interface(True, clock()) == [Notify(INIT, BACKUP, "interface_up")]
    m3 = VrrpMachine(cfg(100))
    m3.on_interface(False, clock())
    assert m3.on_interface(True, clock()) == []  # not started: stays in Initialize
    assert m3.state is INIT


# ---- priority offsets (track weights) ----------------------------------------------


def test_priority_offset_clamps():
    m = VrrpMachine(cfg(100))
    m.set_priority_offset(-500, 0.0)
    assert m.priority == 1
    m.set_priority_offset(+500, 0.0)
    assert m.priority == 254
    m.set_priority_offset(-30, 0.0)
    assert m.priority == 70
    owner = VrrpMachine(cfg(255))
    owner.set_priority_offset(-100, 0.0)
    assert owner.priority == 255


def test_master_priority_change_is_advertised(clock):
    m = master(clock, 100)
    t = clock.advance(0.3)
    acts = m.set_priority_offset(-20, t)
    assert [a.priority for a in sent(acts)] == [80]
    assert m.next_deadline() == pytest.approx(t + 1.0)
    assert m.set_priority_offset(-20, t) == []  # no change, nothing sent
    assert sent(m.on_timer(m.next_deadline()))[0].priority == 80


def test_backup_priority_change_changes_skew(clock):
    m = backup(clock, 100)
    m.set_priority_offset(+50, clock())
    t = clock.advance(1)
    m.on_advert(adv(200), PEER_LO, t)
    assert m.next_deadline() == pytest.approx(t + mdi(150))


# ---- a small network of machines -------------------------------------------------


class Net:
    """Machines on one segment: adverts go through encode/decode, no loss."""

    def __init__(self, clock: Clock, *machines: VrrpMachine) -> None:
        self.clock = clock
        self.machines = list(machines)
        self.vip_holder: set[int] = set()
        self.log: list[tuple[float, int, Notify]] = []

    def apply(self, i: int, actions) -> None:
        src = self.machines[i].config.primary_address
        for a in actions:
            if isinstance(a, AddVips):
                assert i not in self.vip_holder
                self.vip_holder.add(i)
            elif isinstance(a, RemoveVips):
                self.vip_holder.discard(i)
            elif isinstance(a, Notify):
                self.log.append((self.clock(), i, a))
            elif isinstance(a, SendAdvert):
                wire = encode(a.advert, src, VRRP_MCAST_V4)
                for j, other in enumerate(self.machines):
                    if j != i:  # multicast loop is off
                        got = decode(wire, src, VRRP_MCAST_V4, ttl=255)
                        self.apply(j, other.on_advert(got, src, self.clock()))

    def start(self) -> None:
        for i, m in enumerate(self.machines):
            self.apply(i, m.start(self.clock()))

    def run_until(self, t_end: float) -> None:
        while True:
            due = [(m.next_deadline(), i) for i, m in enumerate(self.machines)]
            due = [(d, i) for d, i in due if d is not None and d <= t_end]
            if not due:
                break
            d = min(due)[0]
            self.clock.t = max(self.clock.t, d)
            # timers expiring at the same instant all run before any advert
            # arrives (their adverts cross on the wire)
            fired = [(i, self.machines[i].on_timer(self.clock())) for dd, i in due if dd == d]
            for i, actions in fired:
                self.apply(i, actions)
        self.clock.t = t_end

    def masters(self) -> list[int]:
        return [i for i, m in enumerate(self.machines) if m.state is MASTER]


def test_net_converges_and_track_weight_moves_master(clock):
    a = VrrpMachine(cfg(110, primary_address=PEER_LO))
    b = VrrpMachine(cfg(100, primary_address=PEER_HI))
    net = Net(clock, a, b)
    net.start()
    net.run_until(clock() + 10)
    assert net.masters() == [0] and net.vip_holder == {0}
    assert b.master_address == PEER_LO

    # a tracked interface on A fails: weight -20 -> 90 < 100, B preempts
    t_fail = clock()
    net.apply(0, a.set_priority_offset(-20, clock()))
    net.run_until(clock() + 10)
    assert net.masters() == [1] and net.vip_holder == {1}
    assert a.state is BACKUP and a.master_address == PEER_HI
    takeover = [t for t, i, n in net.log if i == 1 and n.new_state is MASTER][-1]
    assert takeover - t_fail <= mdi(100) + 1e-9
    assert [n.reason for t, i, n in net.log if i == 0 and n.old_state is MASTER] == [
        "higher_priority"
    ]

    # recovered: A (preempt) takes it back
    net.apply(0, a.set_priority_offset(0, clock()))
    net.run_until(clock() + 10)
    assert net.masters() == [0] and net.vip_holder == {0}


def test_net_equal_priority_tie_break_and_graceful_stop(clock):
    a = VrrpMachine(cfg(100, primary_address=PEER_LO))
    b = VrrpMachine(cfg(100, primary_address=PEER_HI))
    net = Net(clock, a, b)
    net.start()  # both time out together, both become master, the higher address stays
    net.run_until(clock() + 10)
    assert net.masters() == [1] and net.vip_holder == {1}
    assert sorted((i, n.new_state.value, n.reason) for t, i, n in net.log[2:]) == [
        (0, "backup", "tie_break"),
        (0, "master", "master_down"),
        (1, "master", "master_down"),
    ]
    t_stop = clock()
    net.apply(1, b.shutdown(clock()))
    net.run_until(clock() + 5)
    assert net.masters() == [0] and net.vip_holder == {0}
    takeover = [t for t, i, n in net.log if i == 0 and n.new_state is MASTER][-1]
    assert takeover - t_stop == pytest.approx(skew(100))


def test_net_v2_with_auth(clock):
    kw = dict(version=2, auth_type=1, auth_data=b"s3cret")
    a = VrrpMachine(cfg(150, primary_address=PEER_LO, **kw))
    b = VrrpMachine(cfg(100, primary_address=PEER_HI, **kw))
    net = Net(clock, a, b)
    net.start()
    net.run_until(clock() + 10)
    assert net.masters() == [0]
    assert b.counters.rejected == {} and b.counters.adverts_accepted > 5


# ---- learned interval, bad adverts -------------------------------------------------


def test_v3_backup_learns_master_interval(clock):
    m = backup(clock, 100)  # configured 100 cs
    t = clock.advance(0.1)
    m.on_advert(adv(200, interval_cs=10), PEER_LO, t)
    assert m.master_adver_interval_cs == 10
    assert m.master_down_interval == pytest.approx(mdi(100, 10))
    assert m.next_deadline() == pytest.approx(t + 0.3 + skew(100, 10))
    # the master changes its interval: learned again
    t = clock.advance(0.1)
    m.on_advert(adv(200, interval_cs=400), PEER_LO, t)
    assert m.next_deadline() == pytest.approx(t + mdi(100, 400))
    # when we become master we advertise at our own interval
    acts = m.on_timer(m.next_deadline())
    assert sent(acts)[0].interval_cs == 100 and m.master_adver_interval_cs == 100


def test_v2_interval_mismatch_dropped(clock):
    m = backup(clock, 100, version=2)
    dl = m.next_deadline()
    m.on_advert(adv(200, interval_cs=200, version=2), PEER_LO, clock.advance(0.5))
    assert m.counters.rejected["interval"] == 1
    assert m.next_deadline() == dl and m.master_address is None


@pytest.mark.parametrize(
    "advert, src, reason",
    [
        (adv(200, vrid=8), PEER_LO, "vrid"),
        (adv(200, version=2, auth_data=b"\0" * 8), PEER_LO, "version"),
        (adv(200), ME, "loopback"),
        (adv(200, addresses=[ipaddress.IPv6Address("2001:db8::1")]), PEER_LO, "family"),
        (adv(200), ipaddress.IPv6Address("fe80::1"), "family"),
        (adv(200, type=2), PEER_LO, "type"),
    ],
)
@pytest.mark.parametrize("start_master", [False, True])
def test_bad_adverts_no_state_change(clock, advert, src, reason, start_master):
    m = master(clock, 100) if start_master else backup(clock, 100)
    state, dl, who = m.state, m.next_deadline(), m.master_address
    assert m.on_advert(advert, src, clock.advance(0.1)) == []
    assert (m.state, m.next_deadline(), m.master_address) == (state, dl, who)
    assert m.counters.rejected == {reason: 1}
    assert m.counters.adverts_received == 1 and m.counters.adverts_accepted == 0


@pytest.mark.parametrize(
    "advert, reason",
    [
        (adv(200, version=2, auth_type=1, auth_data=b"wrong"), "auth"),
        (adv(200, version=2, auth_type=0), "auth"),
        (
            adv(200, version=2, auth_type=1, auth_data=b"pw", addresses=[A4("10.0.0.99")]),
            "addresses",
        ),
    ],
)
def test_bad_v2_adverts_no_state_change(clock, advert, reason):
    m = backup(clock, 100, version=2, auth_type=1, auth_data=b"pw")
    dl = m.next_deadline()
    assert m.on_advert(advert, PEER_LO, clock.advance(0.1)) == []
    assert m.next_deadline() == dl and m.counters.rejected == {reason: 1}
    # the owner may advertise a different address list in v2
    owner_adv = adv(255, version=2, auth_type=1, auth_data=b"pw", addresses=[A4("10.0.0.99")])
    m.on_advert(owner_adv, PEER_LO, clock())
    assert m.master_address == PEER_LO


def test_v3_address_mismatch_counted_but_processed(clock):
    m = backup(clock)
    m.on_advert(adv(200, addresses=[A4("10.0.0.99")]), PEER_LO, clock.advance(0.1))
    assert m.counters.addr_mismatch == 1 and m.master_address == PEER_LO


def test_config_validation():
    with pytest.raises(ValueError):
        cfg(0)
    with pytest.raises(ValueError):
        cfg(256)
    with pytest.raises(ValueError):
        cfg(100, version=2, interval_cs=150)
    with pytest.raises(ValueError):
        cfg(100, interval_cs=0)
    with pytest.raises(ValueError):
        cfg(100, auth_type=1, auth_data=b"x")  # v3 has no auth
    with pytest.raises(ValueError):
        cfg(100, vips=(ipaddress.IPv6Address("::1"),))
    with pytest.raises(ValueError):
        cfg(100, vips=())
    c = cfg(100, primary_address="10.0.0.2", vips=["10.0.0.100"])
    assert c.primary_address == ME and c.vips == VIPS


# ---- replay of a real keepalived capture ----------------------------------------------


@pytest.mark.parametrize(
    "name, version, interval_cs",
    [("v2-adv1-stop.pcap", 2, 100), ("v3-adv0.1-stop.pcap", 3, 10)],
)
def test_replay_keepalived_capture_as_node_b(name, version, interval_cs):
    """Play node B (10.77.0.12, priority 100) against node A's real adverts: we
    must stay backup while A advertises and take over Skew_Time after A's
    priority-0 advert, when keepalived's B did (within a few ms)."""
    b = VrrpMachine(
        Config(
            vrid=77,
            priority=100,
            version=version,
            interval_cs=interval_cs,
            primary_address="10.77.0.12",
            vips=["10.77.0.100"],
        )
    )
    pkts = [
        (float(p.time), p[IP])
        for p in rdpcap(str(Path(__file__).resolve().parents[1] / "vectors" / "vrrp" / name))
        if IP in p and p[IP].proto == 112
    ]
    b.start(pkts[0][0] - 0.01)
    took_over = None
    b_first_advert = None
    for t, ip in pkts:
        while (d := b.next_deadline()) is not None and d <= t:
            acts = b.on_timer(d)
            if any(isinstance(a, Notify) and a.new_state is MASTER for a in acts):
                took_over = d
        a = decode(bytes(ip.payload), ip.src, ip.dst, ttl=ip.ttl)
        if ip.src == "10.77.0.12" and b_first_advert is None:
            b_first_advert = t
        b.on_advert(a, ip.src, t)
        if took_over is None:
            assert b.state is BACKUP
    assert b.state is MASTER
    assert took_over == pytest.approx(b_first_advert, abs=0.01)
    assert b.counters.rejected["loopback"] > 0  # B's own adverts in the capture
    assert set(b.counters.rejected) == {"loopback"}


def test_v2_skew_time_is_rfc3768():
    """RFC 3768: Skew_Time = (256 - Priority) / 256 seconds, whatever the interval."""
    m = VrrpMachine(cfg(100, version=2, interval_cs=300))
    assert m.skew_time == pytest.approx(156 / 256)
    assert m.master_down_interval == pytest.approx(9 + 156 / 256)
    m3 = VrrpMachine(cfg(100, version=3, interval_cs=300))
    assert m3.skew_time == pytest.approx(3 * 156 / 256)
