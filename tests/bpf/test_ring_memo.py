"""A change undone (real added then removed, a health flap) reuses the ring of two
changes ago instead of a Maglev rebuild; the ring is the one a fresh build gives."""

from l4lb import maglev

REALS = [(f"10.97.0.{i + 1}", f"02:97:00:00:00:{i + 1:02x}", 100) for i in range(20)]


def test_flap_back_reuses_the_ring(st, monkeypatch):
    vs = st.upsert_vip("10.99.0.100", 80, "tcp", ring_size=4093)
    st.set_reals(vs.key, REALS)
    first = list(st.live_ring(vs.key))
    st.set_reals(vs.key, REALS + [("10.97.0.99", "02:97:00:00:00:99", 100)])
    with_extra = list(st.live_ring(vs.key))
    assert with_extra != first

    builds = []
    real_build = maglev.build_ring
    monkeypatch.setattr(maglev, "build_ring", lambda *a: builds.append(a) or real_build(*a))
    st.set_reals(vs.key, REALS)  # undo: no rebuild, the same ring as before
    assert builds == [] and list(st.live_ring(vs.key)) == first
    assert st.set_down(vs.key, REALS[3][0], True)  # a new input: rebuilt
    assert len(builds) == 1
    down = list(st.live_ring(vs.key))
    ids = {r.address: r.real_id for r in st.vips[vs.key].reals.values()}
    assert ids[REALS[3][0]] in first and ids[REALS[3][0]] not in down
    assert st.set_down(vs.key, REALS[3][0], False)  # the flap back: memo again
    assert len(builds) == 1 and list(st.live_ring(vs.key)) == first
    # what the memo gave is what a fresh build gives
    fresh = real_build([maglev.Backend(ids[a], a, w) for a, _, w in REALS], 4093)
    assert list(fresh) == first
    # a weight change is a new input too
    st.set_weight(vs.key, REALS[0][0], 50)
    assert len(builds) == 2 and list(st.live_ring(vs.key)) != first
