"""Tasks: a name, a description, train / validation / test text and in-context demonstrations.

Text always comes through ``datasets``: ``load_dataset("json" | "text", data_files=...)`` for local
and packaged corpora, or a hub dataset name for users who can reach the hub. ``data_files`` may use
``{pkg:MODULE}`` (the folder of an installed package), ``{stdlib}`` (this Python's standard
library) and ``{include}`` (this Python's C headers) so packaged corpora need no absolute paths.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import random
import re
import sysconfig
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets


@dataclass
class TaskSpec:
    """Where one task's text comes from.

    Args:
        name: unique task name (used in file names, metric names and tables).
        description: one or two sentences describing the task, for description conditioning.
        builder: ``datasets`` builder: ``json``, ``text``, ``json_mapping`` (a JSON object whose
            values are records) or a hub dataset name.
        data_files: file path(s) or glob(s) for local builders; may contain ``{pkg:MODULE}``,
            ``{stdlib}`` or ``{include}``.
        text_field: column holding the text.
        where: keep only rows whose column equals the value, e.g. ``{topic: Mathematics}``; a value
            ending in ``*`` matches as a prefix (``{categories: "cs.LG*"}``); a list-valued column
            is matched by its first item (arXiv's primary category).
        hub_config: dataset configuration name for hub datasets.
        split: dataset split to read (train / validation / test are carved from it).
        strip_front_matter: drop a leading ``---``-delimited YAML block from each document.
        chunk_chars: cut each document into pieces of about this many characters at line breaks,
            for corpora that ship as a few large files (a whole Bible, a long JSON schema); each
            piece is then a document of its own. ``None`` keeps documents whole.
        train_chars: train the task's LoRA on at most this many characters, fewer than the
            ``TextBudget``'s (a long-tail task with little data); its validation, test and
            demonstration text stay the same. ``None``: the budget's.
    """

    name: str
    description: str = ""
    builder: str = "json"
    data_files: str | list[str] | None = None
    text_field: str = "text"
    where: dict[str, str] = field(default_factory=dict)
    hub_config: str | None = None
    split: str = "train"
    strip_front_matter: bool = False
    chunk_chars: int | None = None
    train_chars: int | None = None

    def __post_init__(self) -> None:
        for option in ("chunk_chars", "train_chars"):
            value = getattr(self, option)
            if value is not None and value < 1:
                raise ValueError(f"task {self.name!r}: {option} must be positive, got {value}")

    def hashed(self) -> dict:
        """The fields that identify the task's text; options left at their default are omitted, so
        adding an option does not make existing zoos stale."""
        return {k: v for k, v in asdict(self).items() if not (k in _OPTIONAL and v == _OPTIONAL[k])}


_OPTIONAL = {"chunk_chars": None, "train_chars": None}  # options added after zoos existed, with their defaults


@dataclass
class TextBudget:
    """How much of each task's text goes to each split (documents never straddle splits).

    Args:
        train_chars: characters of training text for the task's LoRA.
        val_chars: held-out characters for choosing checkpoints and settings.
        test_chars: held-out characters that are only reported.
        num_demos: documents set aside as in-context demonstrations (never in train/val/test).
        demo_chars: each demonstration is cut to this many characters.
        max_doc_chars: each document is cut to this many characters, so one long file cannot
            fill a split.
        seed: seed of the document shuffle.
    """

    train_chars: int = 300_000
    val_chars: int = 6_000
    test_chars: int = 8_000
    num_demos: int = 16
    demo_chars: int = 400
    max_doc_chars: int = 3_000
    seed: int = 0


@dataclass
class Task:
    """A task's loaded text, split."""

    name: str
    description: str
    train: list[str]
    val: str
    test: str
    demos: list[str]


def resolve_data_files(data_files: str | list[str] | None) -> list[str]:
    """Expand placeholders and globs; the result is sorted for reproducibility."""
    if data_files is None:
        return []
    patterns = [data_files] if isinstance(data_files, str) else list(data_files)
    out: list[str] = []
    for pattern in patterns:
        pattern = pattern.replace("{stdlib}", sysconfig.get_paths()["stdlib"])
        pattern = pattern.replace("{include}", sysconfig.get_paths()["include"])
        for module in re.findall(r"\{pkg:([\w.]+)\}", pattern):
            spec = importlib.util.find_spec(module)
            if spec is None or not spec.submodule_search_locations:
                raise ModuleNotFoundError(
                    f"data_files {pattern!r} needs the package {module!r}: run `make install`"
                )
            pattern = pattern.replace(f"{{pkg:{module}}}", spec.submodule_search_locations[0])
        matches = sorted(glob.glob(pattern, recursive=True))
        if not matches:
            raise FileNotFoundError(f"data_files {pattern!r} matches no file")
        out.extend(matches)
    return out


def load_documents(spec: TaskSpec) -> list[str]:
    """All non-empty documents of ``spec`` after filtering, in a stable order."""
    files = resolve_data_files(spec.data_files)
    if spec.builder == "json_mapping":
        records = []
        for path in files:
            with open(path, encoding="utf-8") as f:
                records.extend(json.load(f).values())
        ds = datasets.Dataset.from_list(records)
    elif spec.builder in ("json", "text"):
        kwargs = {"sample_by": "document"} if spec.builder == "text" else {}
        ds = datasets.load_dataset(spec.builder, data_files=files, split=spec.split, **kwargs)
    else:
        try:
            ds = datasets.load_dataset(spec.builder, spec.hub_config, split=spec.split)
        except (ConnectionError, OSError, ValueError) as err:  # offline or unknown: datasets' errors vary
            from icm_lora.base import OFFLINE_HINT, Unreachable

            raise Unreachable(f"task {spec.name!r}: could not load hub dataset {spec.builder!r}: "
                              f"{str(err).splitlines()[0]}. {OFFLINE_HINT}") from err
    if spec.text_field not in ds.column_names:
        raise KeyError(f"task {spec.name!r}: no column {spec.text_field!r} in {files or spec.builder} "
                       f"(columns: {ds.column_names})")
    for key, value in spec.where.items():
        if key not in ds.column_names:
            raise KeyError(f"task {spec.name!r}: 'where' names column {key!r}, not in {ds.column_names}")
        ds = ds.filter(lambda row, k=key, v=value: _matches(row[k], v))
    docs = [_clean(t, spec.strip_front_matter) for t in ds[spec.text_field]]
    if spec.chunk_chars is not None:
        docs = [piece for doc in docs for piece in chunk_lines(doc, spec.chunk_chars)]
    docs = [d for d in docs if d]
    if not docs:
        raise ValueError(f"task {spec.name!r} is empty: no text in {files or spec.builder} "
                         f"(column {spec.text_field!r}, where={spec.where})")
    return docs


def _matches(cell: object, value: str) -> bool:
    """Exact match, or a prefix match when ``value`` ends with ``*``; a list cell by its first item."""
    if isinstance(cell, (list, tuple)):
        cell = cell[0] if cell else None
    cell = "" if cell is None else str(cell)
    return cell.startswith(value[:-1]) if value.endswith("*") else cell == value


def chunk_lines(text: str, size: int) -> list[str]:
    """``text`` in consecutive pieces of whole lines, each about ``size`` characters (a single longer
    line is cut); stripped, empty pieces dropped."""
    pieces, current, used = [], [], 0
    for line in text.splitlines(keepends=True):
        while len(line) > size:  # one line longer than a piece: cut it
            line_head, line = line[:size], line[size:]
            pieces.append("".join(current) + line_head)
            current, used = [], 0
        if used + len(line) > size and current:
            pieces.append("".join(current))
            current, used = [], 0
        current.append(line)
        used += len(line)
    pieces.append("".join(current))
    return [p.strip() for p in pieces if p.strip()]


def _clean(text: str | list[str] | None, strip_front_matter: bool) -> str:
    if isinstance(text, (list, tuple)):  # a record holding its text as lines (verse, dialogue turns)
        text = "\n".join(str(line) for line in text if line is not None)
    text = (text or "").strip()
    if strip_front_matter and text.startswith("---"):
        end = text.find("\n---", 3)
        text = text[end + 4 :].strip() if end != -1 else ""
    return text


def split_task(spec: TaskSpec, budget: TextBudget) -> Task:
    """Shuffle documents once and carve test, validation, demonstrations, then train from them."""
    docs = load_documents(spec)
    random.Random(f"{budget.seed}:{spec.name}").shuffle(docs)
    docs = [d[: budget.max_doc_chars] for d in docs]
    test, docs = _take_chars(docs, budget.test_chars)
    val, docs = _take_chars(docs, budget.val_chars)
    demos, docs = docs[: budget.num_demos], docs[budget.num_demos :]
    train, _ = _take_chars(docs, min(budget.train_chars, spec.train_chars or budget.train_chars))
    for split, part in (("test", test), ("validation", val), ("train", train)):
        if not part:
            raise ValueError(f"task {spec.name!r} has too little text for its {split} split "
                             f"({len(load_documents(spec))} documents); lower the TextBudget")
    if not demos:
        raise ValueError(f"task {spec.name!r} has no documents left for demonstrations")
    return Task(spec.name, spec.description, train, "\n\n".join(val), "\n\n".join(test),
                [d[: budget.demo_chars] for d in demos])


def _take_chars(docs: list[str], budget: int) -> tuple[list[str], list[str]]:
    """Take whole documents until ``budget`` characters (the last one cut to fit)."""
    taken, used = [], 0
    for i, doc in enumerate(docs):
        if used >= budget:
            return taken, docs[i:]
        taken.append(doc[: budget - used])
        used += len(taken[-1])
    return taken, []


def fingerprint(*parts: object) -> str:
    """Short stable hash of dataclasses / JSON-able values, to tell stale zoo entries."""
    blob = json.dumps([asdict(p) if hasattr(p, "__dataclass_fields__") else p for p in parts],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def slug(name: str) -> str:
    """File-name-safe version of a task name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "task"


def load_task_file(path: str | Path) -> dict:
    """Read a user's task file (JSON or YAML): name, description and/or examples."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: cannot read task file: {err}") from err
    if not isinstance(data, dict) or "name" not in data:
        raise ValueError(f"{path}: a task file needs a mapping with at least 'name'")
    if not data.get("examples") and not data.get("description"):
        raise ValueError(f"{path}: task {data['name']!r} needs 'examples' and/or 'description'")
    return data
