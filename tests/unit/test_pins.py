"""Pin directories of a node: after an upgrade (new layout) or a resize, the old ones go."""

from l4lb.dataplane import loader
from l4lb.dataplane import maps as M


def test_stale_layouts_and_sizes_removed_others_kept(tmp_path):
    node = tmp_path / "lb1"
    live = node / f"v{M.LAYOUT_VERSION}-r65537-c1048576"
    old_layout = node / f"v{M.LAYOUT_VERSION - 1}-r65537-c1048576"
    old_size = node / f"v{M.LAYOUT_VERSION}-r65537-c65536"
    bare = node / "v3"  # the oldest naming: layout only
    for d in (live, old_layout, old_size, bare):
        d.mkdir(parents=True)
        (d / "conns").write_text("map")
    stranger = node / "notes"  # not ours: never touched
    stranger.mkdir()
    (node / "v9-file").write_text("a file, not a pin directory")
    other_node = tmp_path / "lb2" / f"v{M.LAYOUT_VERSION - 1}-r65537-c1048576"
    other_node.mkdir(parents=True)

    gone = loader.remove_stale_pins(str(live))
    assert sorted(gone) == sorted(map(str, (old_layout, old_size, bare)))
    assert (live / "conns").exists() and stranger.exists() and (node / "v9-file").exists()
    assert other_node.exists()  # another node's pins are its own daemon's business
    assert loader.remove_stale_pins(str(live)) == []


def test_missing_node_dir_is_nothing_to_do(tmp_path):
    assert loader.remove_stale_pins(str(tmp_path / "none" / "v8-r7-c1024")) == []
