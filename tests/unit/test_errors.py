"""One base class for the errors l4lb reports: the CLI prints any of them as one line
and exits 1, no traceback; other exceptions stay bugs with their traceback."""

import pytest

from l4lb import api, cli, daemon, lab, scripts
from l4lb.dataplane import btf, loader, tables
from l4lb.errors import L4lbError
from l4lb.vrrp import agent

ERRORS = [api.ApiError, daemon.DaemonError, lab.LabError, scripts.ScriptRefused,
          btf.BtfError, loader.DataplaneError, tables.TablesError, agent.AgentError]


@pytest.mark.parametrize("cls", ERRORS, ids=lambda c: c.__name__)
def test_cli_prints_any_l4lb_error_and_exits_1(cls, monkeypatch, capsys):
    assert issubclass(cls, L4lbError)

    def raising():
        raise cls(f"{cls.__name__}: what went wrong and what to do")
    monkeypatch.setattr(cli, "app", raising)
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err == f"l4lb: error: {cls.__name__}: what went wrong and what to do\n"


def test_other_exceptions_are_not_swallowed(monkeypatch):
    def raising():
        raise KeyError("a bug")
    monkeypatch.setattr(cli, "app", raising)
    with pytest.raises(KeyError, match="a bug"):
        cli.main()
