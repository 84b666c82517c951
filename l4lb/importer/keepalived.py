"""A reader for keepalived.conf's grammar (keepalived.conf(5), v2.2), without I/O beyond reading files.

The pipeline follows keepalived's own order, line by line: comments ('#' or '!'
outside quotes, anywhere on a line) are cut, `include` lines are expanded (globs,
relative to the including file's directory), then `@id` / `@^id` conditional
lines are kept or skipped against the config id, `$NAME=value` definitions
(multi-line with a trailing '\\') are recorded and `$NAME` / `${NAME}` replaced.
The words of each line then build a tree of `Stmt`: a statement ends at the end
of its line, at '{' (its block opens, on the same line or the next) or at '}'.

Every problem is collected with its file:line and raised together as
ImportFailed: unbalanced braces, unterminated quotes, includes that loop or
match nothing, files that are not text.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from l4lb.importer.report import ImportFailed, Loc, Report

MAX_INCLUDE_DEPTH = 32
MAX_SUBST_DEPTH = 32
MAX_FILE_BYTES = 4 * 1024 * 1024  # no keepalived.conf is this big; a wrong file might be
INCLUDE_WORDS = ("include", "includer", "includem", "includew", "includeb", "includea")
_DEF = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)=(.*)$")
_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)(?=\s|$)")


@dataclass
class Stmt:
    """One statement: `keyword args...`, with `children` when a block follows."""

    keyword: str
    args: list[str]
    loc: Loc
    children: list[Stmt] | None = None
    quoted: list[bool] = field(default_factory=list)  # per word of [keyword] + args

    @property
    def words(self) -> list[str]:
        return [self.keyword, *self.args]

    def text(self) -> str:
        return " ".join(self.words)


@dataclass
class Skipped:
    """A conditional line left out for this config id (reported, never silent)."""

    loc: Loc
    text: str
    cond: str


@dataclass
class Parsed:
    stmts: list[Stmt]
    skipped: list[Skipped]
    files: list[str]  # every file read, in order


def display_name(path: Path, root: Path | None) -> str:
    if root is not None:
        try:
            return str(path.resolve().relative_to(root.resolve()))
        except ValueError:
            pass
    return str(path)


def read_text(path: Path, shown: str, loc: Loc | None, report: Report) -> str | None:
    """A file's text, or None after recording why it cannot be a config file."""
    where = f"{loc}: " if loc else ""
    try:
        st = path.stat()
        if not path.is_file():
            report.error(None, f"{where}{shown} is not a regular file")
            return None
        if st.st_size > MAX_FILE_BYTES:
            report.error(None, f"{where}{shown} is {st.st_size} bytes; a config file is at most "
                         f"{MAX_FILE_BYTES} (is this the right file?)")
            return None
        raw = path.read_bytes()
    except OSError as e:
        report.error(None, f"{where}cannot read {shown}: {e.strerror or e}")
        return None
    if b"\0" in raw:
        report.error(None, f"{shown}:1: binary data (NUL bytes); not a config file")
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        report.error(None, f"{shown}:{line}: not UTF-8 text; not a config file")
        return None


def split_words(text: str, loc: Loc, report: Report) -> tuple[list[str], list[bool]] | None:
    """keepalived's word splitting: quotes (" or ') join, braces stand alone, # and ! end the line.

    Returns (words, quoted flags), or None after reporting an unterminated quote.
    """
    words: list[str] = []
    quoted: list[bool] = []
    cur: list[str] = []
    in_word = was_quoted = False
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in "\"'":
            end = i + 1
            buf = []
            while end < n and text[end] != c:
                if text[end] == "\\" and c == '"' and end + 1 < n:
                    end += 1
                buf.append(text[end])
                end += 1
            if end >= n:
                report.error(loc, f"unterminated {c} quote; close it on the same line")
                return None
            cur.append("".join(buf))
            in_word = was_quoted = True
            i = end + 1
            continue
        if c in "#!":
            break
        if c.isspace() or c in "{}":
            if in_word:
                words.append("".join(cur))
                quoted.append(was_quoted)
                cur, in_word, was_quoted = [], False, False
            if c in "{}":
                words.append(c)
                quoted.append(False)
            i += 1
            continue
        cur.append(c)
        in_word = True
        i += 1
    if in_word:
        words.append("".join(cur))
        quoted.append(was_quoted)
    return words, quoted


def strip_comment(line: str) -> str:
    q = None
    for i, c in enumerate(line):
        if q:
            if c == q:
                q = None
        elif c in "\"'":
            q = c
        elif c in "#!":
            return line[:i]
    return line


class _Reader:
    def __init__(self, report: Report, config_id: str | None, root: Path | None) -> None:
        self.report = report
        self.config_id = config_id
        self.root = root
        self.params: dict[str, list[str]] = {}
        self.skipped: list[Skipped] = []
        self.files: list[str] = []

    def lines(self, path: Path, stack: tuple[Path, ...], via: Loc | None) -> Iterator[tuple[Loc, str]]:
        shown = display_name(path, self.root)
        text = read_text(path, shown, via, self.report)
        if text is None:
            return
        self.files.append(shown)
        it = iter(enumerate(text.splitlines(), 1))
        for no, raw in it:
            loc = Loc(shown, no)
            line = strip_comment(raw).strip()
            if not line:
                continue
            first = line.split(None, 1)[0]
            if first in INCLUDE_WORDS:
                yield from self._include(path, line, loc, stack)
                continue
            m = _DEF.match(line)
            if m and m.group(2).rstrip().endswith("\\"):  # multi-line definition
                body = [m.group(2).rstrip()[:-1].strip()]
                for _, more in it:
                    more = more.strip()
                    cont = more.endswith("\\")
                    body.append(more[:-1].strip() if cont else more)
                    if not cont:
                        break
                self.params[m.group(1)] = [b for b in body if b]
                continue
            yield from self._logical(loc, line, 0)

    def _logical(self, loc: Loc, line: str, depth: int) -> Iterator[tuple[Loc, str]]:
        """Conditionals, definitions and substitution of one line (recursive on expansion)."""
        if depth > MAX_SUBST_DEPTH:
            self.report.error(loc, f"parameter substitution nests deeper than {MAX_SUBST_DEPTH} "
                                   "levels (a $PARAMETER that refers to itself?)")
            return
        if line.startswith("@"):
            cond, rest = (line.split(None, 1) + [""])[:2]
            neg = cond.startswith("@^")
            name = cond[2:] if neg else cond[1:]
            match = self.config_id is not None and name == self.config_id
            if match == neg:
                self.skipped.append(Skipped(loc, rest.strip(), cond))
                return
            line = rest.strip()
            if not line:
                return
        m = _DEF.match(line)
        if m:
            self.params[m.group(1)] = [m.group(2).strip()]
            return
        if "$" not in line:
            yield loc, line
            return
        ref = _REF.fullmatch(line.strip())
        name = ref and (ref.group(1) or ref.group(2))
        if name and name in self.params and len(self.params[name]) > 1:
            for part in self.params[name]:  # a multi-line parameter used alone on its line
                yield from self._logical(loc, part, depth + 1)
            return

        def sub(mm: re.Match) -> str:
            key = mm.group(1) or mm.group(2)
            if key in self.params:
                return " ".join(self.params[key])
            return mm.group(0)  # undefined: left as is, as keepalived does

        new = _REF.sub(sub, line)
        if new == line:
            yield loc, line
        else:
            yield from self._logical(loc, new, depth + 1)

    def _include(self, path: Path, line: str, loc: Loc, stack: tuple[Path, ...]) -> Iterator[tuple[Loc, str]]:
        words = split_words(line, loc, self.report)
        if words is None:
            return
        args = words[0][1:]
        if len(args) != 1:
            self.report.error(loc, f"{words[0][0]} takes one file name or pattern, got {len(args)}")
            return
        pattern = args[0]
        base = path.parent
        full = pattern if os.path.isabs(pattern) else str(base / pattern)
        matches = sorted(glob.glob(full))
        if not matches:
            self.report.error(loc, f"include {pattern}: no file matches {full}")
            return
        if len(stack) >= MAX_INCLUDE_DEPTH:
            self.report.error(loc, f"include {pattern}: includes nest deeper than {MAX_INCLUDE_DEPTH}")
            return
        for m in matches:
            p = Path(m)
            real = p.resolve()
            if real in stack:
                chain = " -> ".join(display_name(s, self.root) for s in stack + (real,))
                self.report.error(loc, f"include {pattern}: include loop ({chain})")
                continue
            if p.is_dir():
                self.report.error(loc, f"include {pattern}: {m} is a directory; include the files in it "
                                       f"(e.g. {pattern.rstrip('/')}/*.conf)")
                continue
            yield from self.lines(p, stack + (real,), loc)


class _Tree:
    """Builds statements from the words of each line; blocks nest by '{' and '}'."""

    def __init__(self, report: Report) -> None:
        self.report = report
        self.top: list[Stmt] = []
        self.open: list[Stmt] = []  # statements whose block is open
        self.last: Stmt | None = None  # the statement that ended the previous line

    def _add(self, words: list[str], quoted: list[bool], loc: Loc) -> Stmt | None:
        if not words:
            return None
        st = Stmt(words[0], words[1:], loc, None, quoted)
        (self.open[-1].children if self.open else self.top).append(st)  # type: ignore[union-attr]
        return st

    def line(self, words: list[str], quoted: list[bool], loc: Loc) -> None:
        cur: list[str] = []
        cur_q: list[bool] = []
        for w, q in zip(words, quoted, strict=True):
            if q or w not in ("{", "}"):
                cur.append(w)
                cur_q.append(q)
                continue
            st = self._add(cur, cur_q, loc)
            cur, cur_q = [], []
            if w == "{":
                st = st or self.last  # "keyword" on one line, "{" on the next
                if st is None or st.children is not None:
                    self.report.error(loc, "'{' without a keyword before it")
                else:
                    st.children = []
                    self.open.append(st)
            elif not self.open:
                self.report.error(loc, "unbalanced '}': no block is open here")
            else:
                self.open.pop()
            self.last = None
        self.last = self._add(cur, cur_q, loc)


def parse_file(path: str | os.PathLike[str], report: Report, *, config_id: str | None = None,
               root: Path | None = None) -> Parsed:
    """Read `path` (and its includes) into statements. Raises ImportFailed on any error."""
    p = Path(path)
    reader = _Reader(report, config_id, root)
    tree = _Tree(report)
    for loc, line in reader.lines(p, (p.resolve(),), None):
        split = split_words(line, loc, report)
        if split is not None:
            tree.line(*split, loc)
    for st in tree.open:
        report.error(st.loc, f"'{{' of {st.keyword} is never closed; add the missing '}}'")
    report.raise_errors()
    if not tree.top:
        raise ImportFailed([f"{display_name(p, root)}: no configuration statements (empty file?)"])
    return Parsed(tree.top, reader.skipped, reader.files)


def walk(stmts: list[Stmt]) -> Iterator[Stmt]:
    for st in stmts:
        yield st
        if st.children:
            yield from walk(st.children)


__all__ = ["Stmt", "Parsed", "Skipped", "parse_file", "split_words", "walk", "ImportFailed"]
