"""Find the inputs of a preprocessing job and their labels.

Inputs come from a directory (walked recursively, filtered by the tokenizer's extensions, sorted;
token tables inside it are skipped), a glob pattern (the same), or a manifest file (CSV or JSONL
with a ``path`` column and an optional ``label`` column; a BOM is ignored). A tokenizer that
declares no extensions (``Tokenizer.extensions == ()``, e.g. a folder of TU-format graph files)
takes the given path itself as its one source; ``as_one_source=True`` asks for the same with any
tokenizer.

A file found by walking a folder or matching a glob that is a side file of another input (the
tokenizer's ``companion_files``, e.g. the ``g.features.csv`` of a graph edge list ``g.csv``, passed
as ``companions``) is not an input of its own; a file named explicitly always is.

Labels come from the parent folder name (``labels="folder"``, the ImageFolder convention), a
regular expression with a named group ``label`` applied to the file name (``labels="regex"``), the
manifest's ``label`` column, or nowhere (``labels="none"``: the dataset files themselves may carry
labels, see ``Tokenizer.label_names``). Label names are sorted deterministically (numerically when
every name is an integer) and their index is the class id stored in the table.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from maskloom._paths import url_note
from maskloom.pipelines._gc import gc_paused
from maskloom.tokenizers.base import utf8_text

LabelMode = Literal["auto", "none", "folder", "regex", "manifest"]
LABEL_MODES = ("auto", "none", "folder", "regex", "manifest")
MANIFEST_SUFFIXES = (".csv", ".jsonl", ".json")


class SourceError(ValueError):
    """A user mistake in naming the inputs (missing path, empty input set, bad manifest or regex)."""


@dataclass(frozen=True)
class Input:
    """One input of a preprocessing job."""

    source: str
    """Absolute path of the file (or directory, for tokenizers that read folders)."""
    label: int | None = None
    """Class index into ``InputSet.label_names``, or None (no label, or labels inside the file)."""


@dataclass(frozen=True)
class InputSet:
    """The sorted, de-duplicated inputs of a job and the names of their labels."""

    inputs: tuple[Input, ...]
    """Inputs sorted by source."""
    label_names: tuple[str, ...] | None
    """Class names indexed by ``Input.label``; None when the inputs carry no labels."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Files passed over while walking the given folders because their extension is not one of the
    tokenizer's: count per lower-case extension (``"(none)"`` for a name without one), so that a
    command can say what it left out (a folder of ``.heic`` among ``.jpg``, ``.flac`` for a ``.wav``
    tokenizer). Hidden files, token tables and inputs given by glob or manifest are not counted."""
    missing: tuple[str, ...] = ()
    """Manifest entries that name no file on this machine, kept as inputs: each becomes an error row
    (``missing``) unless the workers see it (a catalogue lists files deleted since; a driver on a
    laptop may not see a cluster's storage). A manifest none of whose entries exists is refused."""

    def __len__(self) -> int:
        return len(self.inputs)


def _sort_names(names: set[str]) -> tuple[str, ...]:
    """Deterministic label order: numeric when every name is an integer, else lexicographic."""
    if names and all(re.fullmatch(r"-?\d+", n) for n in names):
        return tuple(sorted(names, key=int))
    return tuple(sorted(names))


def _has_ext(path: str, extensions: Sequence[str]) -> bool:
    low = path.lower()
    return any(low.endswith(e.lower()) for e in extensions)


TABLE_MARKERS = ("_manifest.json", "_commits")
"""Entries only a token table (finished, or a job's partial one) holds: ``tables.MANIFEST`` and
``preprocess.COMMITS``. Such a directory is output, never input: walking a folder of ``.parquet``
series with the table written inside it would otherwise take the table's own shards as inputs."""


def _is_table(directory: str) -> bool:
    return any(os.path.exists(os.path.join(directory, m)) for m in TABLE_MARKERS)


def _ext_name(name: str) -> str:
    """A file name's lower-case extension as :attr:`InputSet.skipped` counts it."""
    return os.path.splitext(name)[1].lower() or "(none)"


def skipped_text(skipped: dict[str, int]) -> str:
    """``"3 files (.gif 2, .txt 1)"``: the files a walk passed over, most frequent extension first."""
    n = sum(skipped.values())
    parts = ", ".join(f"{e} {c}" for e, c in sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0])))
    return f"{n} file{'s' if n != 1 else ''} ({parts})"


def skipped_note(skipped: dict[str, int], where: str, extensions: Sequence[str]) -> str:
    """``"skipped 1 file (.heic 1) in WHERE: not .jpg/.png"``: what a command tells its user."""
    return f"skipped {skipped_text(skipped)} in {where}: not {'/'.join(extensions)}"


def _walk(directory: str, extensions: Sequence[str], skipped: Counter[str]) -> list[str]:
    """Files under ``directory`` (recursive, hidden entries and token tables skipped) with one of
    ``extensions``; the other (non-hidden) files are counted by extension into ``skipped``.
    Symlinked folders are followed, each real folder once (under the first path that reaches it, in
    sorted order): a link back to an ancestor (``d/up -> ..``) would otherwise list every file below
    it again at each of ~40 levels, until the OS stops the path."""
    if _is_table(directory):
        raise SourceError(f"{directory}: is a token table (maskloom's output), not raw input")
    out = []
    seen: set[tuple[int, int]] = set()
    for root, dirs, files in os.walk(directory, followlinks=True):
        try:
            st = os.stat(root)
        except OSError:  # gone since its parent was listed (a live collection): as os.walk does, skip it
            dirs[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:  # reached again through a link: walked already
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not _is_table(os.path.join(root, d)))
        for f in files:
            if f.startswith("."):
                continue
            if _has_ext(f, extensions):
                out.append(os.path.join(root, f))
            else:
                skipped[_ext_name(f)] += 1
    return out


def _expand(path: str, extensions: Sequence[str], as_one_source: bool, skipped: Counter[str]) -> list[str]:
    """One user-given path or glob -> source paths (a walked folder's other files counted into ``skipped``)."""
    takes_dirs = as_one_source or not extensions
    if note := url_note(path, "a local path"):
        raise SourceError(note)
    if glob.has_magic(path):
        matches = glob.glob(path, recursive=True)
        found = [m for m in matches if os.path.isfile(m) or (takes_dirs and os.path.isdir(m))]
        in_table = {d for d in {os.path.dirname(m) for m in found} if _is_table(d)}
        found = [m for m in found if os.path.dirname(m) not in in_table and not _is_table(m)]
        if not found:
            raise SourceError(f"{path}: the pattern matches no input")
        return found
    if not os.path.exists(path):
        raise SourceError(f"{path}: no such file or directory")
    if os.path.isdir(path) and not takes_dirs:
        return _walk(path, extensions, skipped)
    return [path]


def _read_manifest(path: str) -> list[tuple[str, str | None]]:
    """(path, label or None) rows of a CSV or JSONL manifest; relative paths are relative to it."""
    if not os.path.isfile(path):
        raise SourceError(f"{path}: no such manifest file")
    base = os.path.dirname(os.path.abspath(path))
    rows: list[dict] = []
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: drops the BOM spreadsheets write
            if path.lower().endswith(".csv"):
                rows = list(csv.DictReader(f))
            else:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            row = json.loads(line)
                        except json.JSONDecodeError as e:
                            raise SourceError(f"{path}:{n}: not a JSON object ({e.msg})") from None
                        if not isinstance(row, dict):
                            raise SourceError(f"{path}:{n}: each line must be a JSON object with a 'path'")
                        rows.append(row)
    except UnicodeDecodeError as e:
        raise SourceError(f"{path}: manifest is not UTF-8 text ({e.reason})") from None
    out = []
    for n, row in enumerate(rows, 1):
        p = row.get("path")
        if not p:
            raise SourceError(f"{path}: entry {n} has no 'path' (columns: {sorted(row)})")
        if not isinstance(p, str):
            raise SourceError(f"{path}: entry {n}: 'path' must be a string, got {type(p).__name__} {p!r}")
        if note := url_note(p, "a local path"):
            raise SourceError(f"{path}: entry {n}: {note}")
        label = row.get("label")
        if label is not None and (isinstance(label, bool) or not isinstance(label, (str, int, float))):
            raise SourceError(
                f"{path}: entry {n}: 'label' must be a string or a number, got {type(label).__name__} {label!r}"
            )
        label = None if label is None or str(label) == "" else str(label)
        out.append((p if os.path.isabs(p) else os.path.join(base, p), label))
    return out


@gc_paused()
def find_inputs(
    paths: str | Sequence[str],
    *,
    extensions: Sequence[str] = (),
    labels: LabelMode = "auto",
    label_regex: str | None = None,
    manifest: bool = False,
    as_one_source: bool = False,
    companions: Callable[[str], Iterable[str]] | None = None,
) -> InputSet:
    """Resolve user-given paths into a sorted :class:`InputSet`.

    paths:          directories, files or glob patterns (or manifest files with ``manifest=True``).
    extensions:     file extensions kept when walking a directory (the tokenizer's ``extensions``);
                    empty means the given path itself is the one source.
    labels:         where labels come from: auto (regex when ``label_regex`` is given, else the
                    manifest's label column when it has one, else none), none, folder (parent directory name), regex (named group
                    ``label`` of ``label_regex`` searched in the file name), manifest (its column).
    as_one_source:  take every given path (a directory too) as one source, without walking it.
    companions:     the tokenizer's ``companion_files``: a file found by walking a folder or by a
                    glob that is a companion of another input is left out (it is read with that input).

    Raises SourceError for a missing path, a pattern matching nothing, an empty input set, a file
    whose label cannot be found, or a bad manifest.
    """
    if isinstance(paths, str):
        paths = [paths]
    if not paths:
        raise SourceError("no input paths given")
    if labels not in LABEL_MODES:
        raise SourceError(f"labels must be one of {LABEL_MODES}, got {labels!r}")
    if labels == "auto" and label_regex:  # a regex given without --labels means "use it"
        labels = "regex"
    if labels == "manifest" and not manifest:
        raise SourceError("labels='manifest' needs a manifest file as input")
    pattern = None
    if labels == "regex":
        if not label_regex:
            raise SourceError("labels='regex' needs a label regex with a named group 'label'")
        try:
            pattern = re.compile(label_regex)
        except re.error as e:
            raise SourceError(f"label regex {label_regex!r}: {e}") from None
        if "label" not in pattern.groupindex:
            raise SourceError(
                f"label regex {label_regex!r} has no named group 'label', e.g. (?P<label>\\d+)_"
            )

    named: dict[str, str | None] = {}  # absolute source -> label name
    absent: list[str] = []  # manifest entries that name no file here
    explicit: set[str] = set()  # sources named as they are (manifest entries, files), not found
    skipped: Counter[str] = Counter()
    for p in paths:
        if manifest:
            entries = _read_manifest(p)
            if not entries:
                raise SourceError(f"{p}: the manifest lists no inputs")
            gone = [src for src, _ in entries if not os.path.exists(src)]
            if len(gone) == len(entries):  # a wrong base folder, not files deleted since
                every = (
                    f", as is every other of its {len(entries):,} entries: are its paths right?"
                    if len(gone) > 1
                    else ""
                )
                raise SourceError(f"{gone[0]}: no such file or directory (listed in {p}{every})")
            absent += [os.path.abspath(g) for g in gone]
            for src, lab in entries:
                src = os.path.abspath(src)
                if src in named and named[src] != lab:
                    raise SourceError(
                        f"{src}: listed twice with different labels ({named[src]!r}, {lab!r}; in {p})"
                    )
                named[src] = lab
                explicit.add(src)
            continue
        here: Counter[str] = Counter()
        found = _expand(p, extensions, as_one_source, here)
        if not found:
            other = f"; it holds {skipped_text(here)}" if here else ""
            raise SourceError(f"{p}: no input files with extension {', '.join(extensions)}{other}")
        skipped += here
        for src in found:
            named[os.path.abspath(src)] = None
        if found == [p]:  # named explicitly, not found by a walk or a glob
            explicit.add(os.path.abspath(p))

    if companions is not None:
        side = {os.path.normpath(os.path.abspath(c)) for s in named for c in companions(s)}
        named = {s: lab for s, lab in named.items() if s in explicit or s not in side}
    if not named:
        raise SourceError("the input set is empty")
    if labels == "auto":
        labels = "manifest" if manifest and any(lab is not None for lab in named.values()) else "none"
    if labels == "none":
        named = dict.fromkeys(named)
    elif labels == "folder":  # a folder name that is not UTF-8 becomes text with \xNN, as ids do
        named = {s: utf8_text(os.path.basename(os.path.dirname(s))) for s in named}
    elif labels == "regex":
        assert pattern is not None
        for s in named:
            m = pattern.search(os.path.basename(s))
            if m is None or m.group("label") is None:
                raise SourceError(f"{s}: file name does not match the label regex {label_regex!r}")
            named[s] = utf8_text(m.group("label"))
    elif labels == "manifest":
        missing = [s for s, lab in named.items() if lab is None]
        if missing:
            raise SourceError(
                f"{missing[0]}: no label in the manifest (labels='manifest' needs one per entry)"
            )

    names = {lab for lab in named.values() if lab is not None}
    label_names = _sort_names(names) if names else None
    index = {n: i for i, n in enumerate(label_names or ())}
    inputs = tuple(Input(s, None if named[s] is None else index[named[s]]) for s in sorted(named))
    return InputSet(
        inputs=inputs,
        label_names=label_names,
        skipped=dict(skipped),
        missing=tuple(sorted(set(absent) & set(named))),
    )


def missing_note(missing: Sequence[str]) -> str:
    """``3 manifest entries name no file here (first: /data/gone.wav); each becomes an error row
    'missing' unless the workers see it``."""
    n = len(missing)
    what = "1 manifest entry names" if n == 1 else f"{n:,} manifest entries name"
    return f"{what} no file here (first: {missing[0]}); each becomes an error row 'missing' unless the workers see it"
