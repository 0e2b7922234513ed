"""Index files (``*.tsv``): the one reader and writer every subcommand uses.

Contract (docs/ARCHITECTURE.md): UTF-8, tab-separated, a header line; column ``path`` required,
absolute or relative to the index file's directory; optional ``label`` (int, -1 = unknown),
``score`` (float), ``source``; other columns are preserved; row order is meaningful.
"""
from __future__ import annotations

import os
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence, overload

import numpy as np

from .errors import DfkdError
from .io import atomic_write

STREAMED = ("http://", "https://", "pipe:")  # rows of streamed shards (dfkd/remote.py), not relative paths


@dataclass
class Index:
    """Rows of an index file; ``rows[i]["path"]`` is an absolute path string."""

    columns: list[str]
    rows: list[dict[str, str]] = field(default_factory=list)
    source: Path | None = None
    problems: list[dict] = field(default_factory=list)  # folders/files a walk could not list

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def paths(self) -> list[str]:
        return [r["path"] for r in self.rows]

    def labels(self) -> list[int]:
        """Integer labels (-1 where the column is missing or unknown)."""
        if "label" not in self.columns:
            return [-1] * len(self.rows)
        return [parse_label(r.get("label", ""), self.source, i) for i, r in enumerate(self.rows)]


class PathArray(Sequence[str]):
    """Many paths in one UTF-8 buffer: about the path's length plus 16 bytes each, where a list
    of ``str`` costs about 60 more and an index row's dict several hundred. Positions index it;
    :meth:`take` selects rows without copying the text. Undecodable file names round-trip
    (``surrogateescape``)."""

    def __init__(self, blob: bytes, starts: np.ndarray, ends: np.ndarray):
        self.blob, self.starts, self.ends = blob, starts, ends

    @classmethod
    def build(cls, paths: Iterable[str]) -> "PathArray":
        blob, ends = bytearray(), array("q")
        for p in paths:
            blob += p.encode("utf-8", "surrogateescape")
            ends.append(len(blob))
        end = np.array(ends, dtype=np.int64)
        start = np.empty_like(end)
        start[1:] = end[:-1]
        start[:1] = 0
        return cls(bytes(blob), start, end)

    @classmethod
    def of(cls, paths: Sequence[str]) -> "PathArray":
        """``paths`` as a PathArray (itself if it is one)."""
        return paths if isinstance(paths, PathArray) else cls.build(paths)

    def __len__(self) -> int:
        return len(self.starts)

    @overload
    def __getitem__(self, i: int) -> str: ...

    @overload
    def __getitem__(self, i: slice) -> "PathArray": ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            return PathArray(self.blob, self.starts[i], self.ends[i])
        return self.blob[self.starts[i]:self.ends[i]].decode("utf-8", "surrogateescape")

    def take(self, idx: Sequence[int] | np.ndarray) -> "PathArray":
        idx = np.asarray(idx, dtype=np.int64)
        return PathArray(self.blob, self.starts[idx], self.ends[idx])

    def __add__(self, other: "PathArray") -> "PathArray":
        shift = len(self.blob)
        return PathArray(self.blob + other.blob, np.concatenate([self.starts, other.starts + shift]),
                         np.concatenate([self.ends, other.ends + shift]))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and len(self) == len(other) and all(a == b for a, b in zip(self, other))


@dataclass
class Rows:
    """A training set's rows without a dict per row (what train, distill and pu-train keep):
    the paths, integer labels (−1 = unknown) and the problems met while listing them."""

    paths: PathArray
    labels: np.ndarray  # int64
    source: Path | None = None
    problems: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    @classmethod
    def collect(cls, columns: Sequence[str], rows: Iterable[dict], source: Path | None,
                problems: list[dict] | None = None) -> "Rows":
        """Stream ``rows`` (as an index yields them) into a compact set; no row dict is kept."""
        labeled, labels = "label" in columns, array("q")

        def paths() -> Iterator[str]:
            for i, r in enumerate(rows):
                labels.append(parse_label(r.get("label", ""), source, i) if labeled else -1)
                yield r["path"]

        built = PathArray.build(paths())
        return cls(built, np.array(labels, dtype=np.int64), source, list(problems or []))

    def __add__(self, other: "Rows") -> "Rows":
        return Rows(self.paths + other.paths, np.concatenate([self.labels, other.labels]), self.source,
                    self.problems + other.problems)


def parse_label(text: str, source: Path | None, row: int) -> int:
    if text == "" or text is None:
        return -1
    try:
        return int(text)
    except ValueError:
        raise DfkdError(f"{source}: row {row + 2}: label {text!r} is not an integer") from None


def check_path_text(path: str) -> str:
    if "\t" in path or "\n" in path or "\r" in path:
        raise DfkdError(f"path {path!r} contains a tab or newline, which an index file cannot hold;"
                        " rename the file")
    return path


def open_index(path: str | Path) -> tuple[list[str], Iterator[dict[str, str]]]:
    """The columns of an index file and a stream of its rows (relative paths resolved against
    its directory), read line by line: memory does not grow with the file."""
    path = Path(path)
    if not path.is_file():
        raise DfkdError(f"{path}: index file not found")
    try:
        with open(path, encoding="utf-8", newline="") as f:
            header = f.readline()
    except UnicodeDecodeError as e:
        raise DfkdError(f"{path}: not a UTF-8 index file ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DfkdError(f"{path}: cannot read ({e.strerror})") from None
    if not header.strip("\r\n"):
        raise DfkdError(f"{path}: empty index file (expected a header line with a 'path' column)")
    columns = header.rstrip("\r\n").split("\t")
    if "path" not in columns:
        raise DfkdError(f"{path}: header has no 'path' column (got: {', '.join(columns)});"
                        " an index file is tab-separated with a header line")
    if len(set(columns)) != len(columns):
        raise DfkdError(f"{path}: header repeats a column name")
    return columns, _rows(path, columns)


def _rows(path: Path, columns: list[str]) -> Iterator[dict[str, str]]:
    base = path.resolve().parent
    has_label = "label" in columns
    with open(path, encoding="utf-8", newline="") as f:
        f.readline()
        n = 1
        try:
            for line in f:
                n += 1
                line = line.rstrip("\r\n")
                if not line:
                    continue
                cells = line.split("\t")
                if len(cells) != len(columns):
                    raise DfkdError(f"{path}: line {n} has {len(cells)} fields, the header has {len(columns)}")
                row = dict(zip(columns, cells))
                if not row["path"]:
                    raise DfkdError(f"{path}: line {n} has an empty path")
                if not os.path.isabs(row["path"]) and not row["path"].startswith(STREAMED):
                    row["path"] = str(base / row["path"])
                if has_label:
                    parse_label(row["label"], path, n - 2)
                yield row
        except UnicodeDecodeError as e:
            raise DfkdError(f"{path}: not a UTF-8 index file (line {n + 1}: {e.reason})") from None


def read_index(path: str | Path) -> Index:
    """Read a whole index file into memory, resolving relative paths against its directory."""
    columns, rows = open_index(path)
    return Index(columns, list(rows), Path(path))


def format_cell(value: object) -> str:
    """A cell as text; a NUL byte (no file name holds one: a bad row, recorded as skipped) is
    written escaped, as ``\\0``, so that the file stays text."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    text = str(value)
    if "\t" in text or "\n" in text:
        raise DfkdError(f"value {text!r} contains a tab or newline, which an index file cannot hold")
    return text.replace("\0", "\\0")


def write_index(path: str | Path, rows: Iterable[dict], columns: Sequence[str]) -> Path:
    """Write rows atomically; ``path`` first; paths are written absolute."""
    columns = list(columns)
    if "path" not in columns:
        raise ValueError("an index needs a 'path' column")
    columns.remove("path")
    columns.insert(0, "path")

    def write(f) -> None:
        f.write("\t".join(columns) + "\n")
        for row in rows:
            check_path_text(str(row["path"]))
            f.write("\t".join(format_cell(row.get(c)) for c in columns) + "\n")

    return atomic_write(path, write)
