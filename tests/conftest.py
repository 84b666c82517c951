"""Shared test fixtures. Lab and BPF tests need root; they say so instead of
silently passing when run without it."""

import os

import pytest


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = str(item.fspath)
        if "/tests/lab/" in path:
            item.add_marker(pytest.mark.lab)
        if "/tests/bpf/" in path:
            item.add_marker(pytest.mark.bpf)


@pytest.fixture(scope="session", autouse=True)
def _root_for_system_tests(request):
    needs_root = any("/tests/lab/" in str(i.fspath) or "/tests/bpf/" in str(i.fspath)
                     for i in request.session.items)
    if needs_root and os.geteuid() != 0:
        pytest.exit("lab and BPF tests need root: run `sudo make test`", returncode=2)
