"""One base class for the errors l4lb reports: the CLI prints any of them as one line
and exits 1, no traceback; other exceptions stay bugs with their traceback."""

import pytest

from l4lb import api, cli, config, daemon, importer, lab, scripts
from l4lb.dataplane import btf, loader, tables
from l4lb.errors import L4lbError
from l4lb.routing import frr
from l4lb.vrrp import agent

ERRORS = [api.ApiError, daemon.DaemonError, lab.LabError, scripts.ScriptRefused,
          btf.BtfError, loader.DataplaneError, tables.TablesError, agent.AgentError,
          frr.FrrError]


def cli_error(exc, monkeypatch, capsys) -> str:
    """What `l4lb` prints when `exc` escapes a command (and checks it exits 1)."""
    def raising():
        raise exc
    monkeypatch.setattr(cli, "app", raising)
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 1
    return capsys.readouterr().err


@pytest.mark.parametrize("cls", ERRORS, ids=lambda c: c.__name__)
def test_cli_prints_any_l4lb_error_and_exits_1(cls, monkeypatch, capsys):
    assert issubclass(cls, L4lbError)
    err = cli_error(cls(f"{cls.__name__}: what went wrong and what to do"), monkeypatch, capsys)
    assert err == f"l4lb: error: {cls.__name__}: what went wrong and what to do\n"


@pytest.mark.parametrize("cls", [config.ConfigError, importer.ImportFailed],
                         ids=lambda c: c.__name__)
def test_errors_with_a_list_print_every_line(cls, monkeypatch, capsys):
    assert issubclass(cls, L4lbError)
    err = cli_error(cls(["vip[0].port: 70000 is out of range", "node.name: required"]),
                    monkeypatch, capsys)
    assert err.splitlines() == ["l4lb: error: vip[0].port: 70000 is out of range",
                                "node.name: required"]


def test_other_exceptions_are_not_swallowed(monkeypatch):
    def raising():
        raise KeyError("a bug")
    monkeypatch.setattr(cli, "app", raising)
    with pytest.raises(KeyError, match="a bug"):
        cli.main()
