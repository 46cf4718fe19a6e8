"""YAML documents edited by admins (flows, the FAQ catalogue, message templates): positions and problems.

Every finding names the file, line and column, so ``ivr-bridge flows check`` reads like a compiler.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, YAMLError

Severity = Literal["error", "warning"]


@dataclass(frozen=True, order=True)
class Problem:
    """One finding in a file, printed as ``file:line:column: severity: message``."""

    file: str
    line: int
    column: int
    severity: Severity
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}: {self.severity}: {self.message}"


class DocumentError(Exception):
    """A document that cannot be used; ``problems`` names every error with its position."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = sorted(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class Positions:
    """Maps a path of keys/indexes in the YAML document to its (line, column), both 1-based."""

    def __init__(self, root: Any) -> None:
        self.root = root

    def of(self, path: Iterable[Any]) -> tuple[int, int]:
        node = self.root
        best = (1, 1)
        if isinstance(node, CommentedMap | CommentedSeq) and node.lc.line is not None:
            best = (node.lc.line + 1, node.lc.col + 1)  # the document's first key, after leading comments
        for key in path:
            if isinstance(node, CommentedMap) and key not in node:  # 1: {...} is "1" once loaded (see plain)
                key = next((k for k in node if str(k) == str(key)), key)
            if isinstance(node, CommentedMap) and key in node:
                line, col = node.lc.key(key)
                best = (line + 1, col + 1)
                node = node[key]
            elif isinstance(node, CommentedSeq) and isinstance(key, int) and 0 <= key < len(node):
                line, col = node.lc.item(key)
                best = (line + 1, col + 1)
                node = node[key]
            else:
                if isinstance(node, CommentedMap | CommentedSeq) and node.lc.line is not None:
                    best = max(best, (node.lc.line + 1, node.lc.col + 1))
                break
        return best

    def keys(self, path: Iterable[Any]) -> list[Any]:
        """Keys of the mapping at ``path`` in the document (empty if it is not a mapping)."""
        node = self.root
        for key in path:
            try:
                node = node[key]
            except (KeyError, IndexError, TypeError):
                return []
        return list(node.keys()) if isinstance(node, Mapping) else []


def plain(value: Any) -> Any:
    """CommentedMap/Seq -> dict/list with string keys for ints (menu digits may be written unquoted)."""
    if isinstance(value, Mapping):
        return {(str(k) if isinstance(k, int) and not isinstance(k, bool) else k): plain(v)
                for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def parse_yaml(path: str, text: str) -> tuple[Any, list[Problem]]:
    """Parse round-trip YAML (keeps positions); a syntax error becomes one Problem at its line."""
    yaml = YAML(typ="rt")
    try:
        return yaml.load(text), []
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        what = (exc.problem or str(exc)).strip()
        start = exc.context_mark
        if "duplicate key" in str(exc).lower() or type(exc).__name__ == "DuplicateKeyError":
            what = f"duplicate key: {what.split(' with value ')[0]}"  # not a dump of both values
        elif exc.context and start and mark and start.line != mark.line:  # e.g. where an unclosed [ opened
            what = f"{what} ({exc.context.strip()} started at {start.line + 1}:{start.column + 1})"
        return None, [Problem(path, line, col, "error", f"YAML: {what}")]
    except YAMLError as exc:
        return None, [Problem(path, 1, 1, "error", f"YAML: {exc}")]
    except (RecursionError, ValueError, TypeError, OverflowError) as exc:
        return None, [Problem(path, 1, 1, "error", f"YAML: cannot read the document ({type(exc).__name__}: {exc})")]


class Reporter:
    """Collects problems of one document, positioned by paths of keys."""

    def __init__(self, path: str, root: Any = None) -> None:
        self.path = path
        self.positions = Positions(root)
        self.problems: list[Problem] = []

    def problem(self, where: Iterable[Any], message: str, severity: Severity = "error") -> None:
        line, col = self.positions.of(where)
        self.problems.append(Problem(self.path, line, col, severity, message))

    def validation_errors(self, exc: ValidationError, prefix: tuple[Any, ...], what: str) -> None:
        """pydantic errors as problems pointing at the offending key."""
        for err in exc.errors():
            loc = tuple(err["loc"])
            if loc and loc[-1] == "[key]":  # a bad mapping key (a menu digit): point at the key itself
                loc = loc[:-1]
            field_path = ".".join(str(p) for p in loc)
            if err["type"] == "missing":
                msg = f"{what}: missing field '{field_path}'"
                where = prefix + loc[:-1]
            elif err["type"] == "extra_forbidden":
                msg = f"{what}: unknown field '{field_path}'"
                where = prefix + loc
            else:
                reason = err["msg"].removeprefix("Value error, ")
                msg = f"{what}: {field_path}: {reason}" if field_path else f"{what}: {reason}"
                where = prefix + loc
            self.problem(where, msg)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]


def count_errors(problems: Iterable[Problem]) -> int:
    return sum(1 for p in problems if p.severity == "error")
