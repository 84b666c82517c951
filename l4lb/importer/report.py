"""What an import could not carry over, line by line, and the errors that stop it."""

from __future__ import annotations

from dataclasses import dataclass, field

from l4lb.errors import L4lbError

# Kinds of finding, from "it works differently now" to "it is gone".
CHANGED = "changed"  # converted, but l4lb behaves differently: read the message
UNSUPPORTED = "unsupported"  # no equivalent in l4lb: dropped
NOTE = "note"  # kept as is; something the operator should know


@dataclass(frozen=True)
class Loc:
    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class Finding:
    loc: Loc | None
    kind: str
    directive: str
    message: str

    def __str__(self) -> str:
        where = f"{self.loc}: " if self.loc else ""
        return f"{where}{self.kind}: {self.directive}: {self.message}"


class ImportFailed(L4lbError):
    """The input cannot be converted. `errors` are "file:line: message" lines."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def add(self, loc: Loc | None, kind: str, directive: str, message: str) -> None:
        f = Finding(loc, kind, directive, message)
        if f not in self.findings:  # one line per place, even when a block is visited twice
            self.findings.append(f)

    def changed(self, loc: Loc | None, directive: str, message: str) -> None:
        self.add(loc, CHANGED, directive, message)

    def unsupported(self, loc: Loc | None, directive: str, message: str) -> None:
        self.add(loc, UNSUPPORTED, directive, message)

    def note(self, loc: Loc | None, directive: str, message: str) -> None:
        self.add(loc, NOTE, directive, message)

    def error(self, loc: Loc | None, message: str) -> None:
        self.errors.append(f"{loc}: {message}" if loc else message)

    def raise_errors(self) -> None:
        if self.errors:
            raise ImportFailed(self.errors)

    def sorted(self) -> list[Finding]:
        """Findings by file (in the order files were first named) and line."""
        order: dict[str, int] = {}
        for f in self.findings:
            if f.loc is not None:
                order.setdefault(f.loc.file, len(order))
        return sorted(self.findings, key=lambda f: (0, 0, 0) if f.loc is None
                      else (1, order[f.loc.file], f.loc.line))

    def lines(self) -> list[str]:
        return [str(f) for f in self.sorted()]
