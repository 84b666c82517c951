"""l4lb.config.incremental: a run-time change parsed by what it touches gives exactly
what the whole parse gives (config, errors), and keeps the dict form in step."""

from __future__ import annotations

import random

import pytest

from l4lb.config import Capacity, ConfigError, config_from_dict, config_to_dict
from l4lb.config.incremental import Changes

LIMITS = Capacity(max_vips=8, max_real_ids=60, ring_max=65537)


def base_cfg():
    return config_from_dict({
        "node": {"name": "lbt", "interfaces": ["lo"]},
        "healthcheck": {"type": "tcp", "interval_s": 2},
        "vip": [
            {"address": "10.99.0.100", "port": 80, "ring_size": 251,
             "real": [{"address": f"10.98.0.{i}", "weight": 10 + i} for i in range(1, 21)]},
            {"address": "10.99.0.101", "port": 443, "mode": "tun",
             "healthcheck": {"type": "http", "http_path": "/h"},
             "real": [{"address": "10.98.1.1", "mac": "02:00:00:00:00:01"},
                      {"address": "10.98.1.2", "healthcheck": {"type": "none"}}]},
            {"address": "fd99::100", "port": 0, "protocol": "udp", "real": []},
        ],
    }, source="api", limits=LIMITS)


def whole(base, mutate):
    data = config_to_dict(base)
    mutate(data)
    return config_from_dict(data, source="api", limits=LIMITS)


def outcome(fn):
    try:
        return fn()
    except ConfigError as e:
        return ("refused", str(e))


def vip(d, i):
    return d["vip"][i]


def add(i, real):
    return lambda d: vip(d, i).setdefault("real", []).append(real)


def weight(i, j, w):
    return lambda d: vip(d, i)["real"][j].__setitem__("weight", w)


def delete(i, j):
    return lambda d: vip(d, i)["real"].pop(j)


MUTATIONS = [
    ("add", add(0, {"address": "10.98.0.99", "weight": 5, "mac": "02:AA:00:00:00:01"})),
    ("add with its own check", add(1, {"address": "10.98.1.3",
                                       "healthcheck": {"type": "tcp", "port": 8080}})),
    ("weight", weight(0, 3, 0)),
    ("delete", delete(0, 0)),
    ("delete the last", delete(1, 1)),
    ("move a real to the end", lambda d: vip(d, 0)["real"].append(vip(d, 0)["real"].pop(2))),
    ("add and delete", lambda d: (add(0, {"address": "10.98.0.77"})(d), delete(0, 5)(d))),
    ("a VIP's own field", lambda d: vip(d, 0).__setitem__("hash", "source")),
    ("a new VIP", lambda d: d["vip"].append({"address": "10.99.0.102", "port": 22,
                                             "real": [{"address": "10.98.2.1"}]})),
    ("a VIP deleted", lambda d: d["vip"].pop(1)),
    ("a section outside the VIPs", lambda d: d["healthcheck"].__setitem__("rise", 5)),
    ("the first real to another VIP", lambda d: vip(d, 2)["real"].append(
        vip(d, 0)["real"].pop(0))),
    # refusals: the same words as the whole parse
    ("a duplicate real", add(0, {"address": "10.98.0.1"})),
    ("a bad weight", weight(0, 1, 70000)),
    ("a bad address", add(0, {"address": "10.98.0.300"})),
    ("too many real ids", lambda d: vip(d, 0)["real"].extend(
        {"address": f"10.97.0.{k}"} for k in range(1, 50))),
    ("a real of the wrong family", add(0, {"address": "fd98::1"})),
    ("a duplicate VIP", lambda d: d["vip"].append({"address": "10.99.0.100", "port": 80})),
    ("a ring too small", lambda d: vip(d, 0).__setitem__("ring_size", 13)),
]


@pytest.mark.parametrize("name, mutate", MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_a_change_gives_what_the_whole_parse_gives(name, mutate):
    base = base_cfg()
    ch = Changes()
    got = outcome(lambda: ch.candidate(base, mutate, LIMITS))
    want = outcome(lambda: whole(base, mutate))
    assert got == want
    if isinstance(got, tuple):
        return
    assert got.source == "api"
    # the next change starts from the dict form of this one, made without to_dict
    assert ch._form(got) == config_to_dict(got)


def test_real_changes_reuse_the_other_reals_and_parse_only_theirs():
    base = base_cfg()
    ch = Changes()
    cfg = ch.candidate(base, weight(0, 3, 0), LIMITS)
    assert ch.fast == 1 and ch.whole == 0
    assert cfg.vips[0].reals[3].weight == 0
    # untouched reals and VIPs are the very objects of the base: nothing parsed again
    assert all(a is b for k, (a, b) in enumerate(zip(cfg.vips[0].reals, base.vips[0].reals,
                                                      strict=True))
               if k != 3)
    assert cfg.vips[1] is base.vips[1] and cfg.vips[2] is base.vips[2]
    # a refusal goes through the whole parse, so its words are config_from_dict's
    with pytest.raises(ConfigError, match=r"vip\[0\]\.real\[20\]\.address: 10\.98\.0\.1 "
                                          r"duplicates vip\[0\]\.real\[0\]"):
        ch.candidate(cfg, add(0, {"address": "10.98.0.1"}), LIMITS)
    assert ch.whole == 1


def test_a_chain_of_random_changes_stays_equal_to_whole_parses():
    rng = random.Random(16)
    base = base_cfg()
    ch = Changes()
    for step in range(60):
        n = len(base.vips[0].reals)
        op = rng.choice(["add", "del", "weight", "weight", "mac"])
        if op == "add" or n < 3:
            mutate = add(0, {"address": f"10.98.3.{rng.randint(1, 250)}",
                             "weight": rng.randint(0, 300)})
        elif op == "del":
            mutate = delete(0, rng.randrange(n))
        elif op == "weight":
            mutate = weight(0, rng.randrange(n), rng.randint(0, 300))
        else:
            j, mac = rng.randrange(n), f"02:00:00:00:01:{rng.randint(0, 255):02x}"
            mutate = lambda d, j=j, mac=mac: vip(d, 0)["real"][j].__setitem__(  # noqa: E731
                "mac", mac)
        got = outcome(lambda m=mutate, b=base: ch.candidate(b, m, LIMITS))
        assert got == outcome(lambda m=mutate, b=base: whole(b, m)), step
        if not isinstance(got, tuple):
            base = got
    assert ch.fast > 30
    assert ch._form(base) == config_to_dict(base)
