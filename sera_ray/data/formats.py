"""Offline preference data in the formats TRL users already have, read into one pair table.

Two formats are understood, in three containers:

- explicit prompt: columns `prompt`, `chosen` and `rejected`. Each is a string or a chat message
  list (`[{"role": ..., "content": ...}]`). A chosen or rejected message list is either the
  response alone or the whole conversation ending with the assistant response, as in
  UltraFeedback-binarized.
- implicit prompt: only `chosen` and `rejected`, whose shared prefix is the prompt, as in
  Anthropic HH-RLHF. For text, the prompt is the longest common prefix cut back to the end of
  the last "Assistant:" turn marker in it (or the whole common prefix when it has none); for
  message lists, it is the conversation before the last message, which must be the same in both.
- containers: JSON Lines (`.jsonl`, `.ndjson`), Parquet (`.parquet`), a directory written by
  `datasets.Dataset.save_to_disk` (also one split of a saved `DatasetDict`), or a directory of
  JSON Lines and Parquet files.

Every row is checked; a bad row is never dropped silently but reported as file, row, field and
reason. Row numbers are what the user's own tools show: the line number in a JSON Lines file
(from 1), the row index in Parquet and in a saved dataset (from 0).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from sera_ray.data import schema
from sera_ray.data.problems import DataError, Problem, ValidationReport

logger = logging.getLogger(__name__)

# The prompt as a chat message list (JSON text), or null for plain-text data.
PROMPT_MESSAGES = "prompt_messages"

NORMALISED_FIELDS = [
    pa.field(schema.PAIR_ID, pa.string()),
    pa.field(schema.PROMPT, pa.string()),
    pa.field(PROMPT_MESSAGES, pa.string()),
    pa.field(schema.CHOSEN, pa.string()),
    pa.field(schema.REJECTED, pa.string()),
    pa.field(schema.SOURCE, pa.string()),
    pa.field(schema.ITERATION, pa.int32()),
]

# Columns that name a pair, in the order they are looked for.
ID_COLUMNS = ("pair_id", "id", "uid", "example_id", "sample_id")

TURN_MARKER = "Assistant:"
ASSISTANT = "assistant"

JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)

# Names the pipeline writes itself; an input column with one of them passes through renamed.
RESERVED_COLUMNS = {
    PROMPT_MESSAGES,
    schema.PAIR_ID,
    schema.SOURCE,
    schema.ITERATION,
    schema.PROMPT_IDS,
    schema.CHOSEN_IDS,
    schema.REJECTED_IDS,
    schema.TRUNCATED,
    schema.REF_CHOSEN_LOGP,
    schema.REF_REJECTED_LOGP,
    schema.POLICY_CHOSEN_LOGP,
    schema.POLICY_REJECTED_LOGP,
    schema.PREVIOUS_CHOSEN_LOGP,
    schema.PREVIOUS_REJECTED_LOGP,
    schema.CHOSEN_LEN,
    schema.REJECTED_LEN,
    schema.CHOSEN_REWARD,
    schema.REJECTED_REWARD,
    schema.MARGIN,
    schema.KEPT,
}
RENAMED_PREFIX = "input_"

OnBadRow = Literal["error", "skip"]


@dataclass
class RejectedRow:
    """A row that was not loaded, with every reason, and the record as read (when it parsed)."""

    file: str
    row: int | None
    problems: list[Problem]
    record: dict[str, Any] | None = None
    text: str | None = None  # the raw line, when it was not a JSON object

    def to_json(self) -> str:
        line = {
            "file": self.file,
            "row": self.row,
            "problems": [{"field": p.field, "reason": p.reason} for p in self.problems],
            "record": self.record,
        }
        if self.text is not None:
            line["text"] = self.text
        return json.dumps(line, default=_json_default)


@dataclass
class PairsRead:
    """Everything reading a path found: the valid pairs as a table, the report, the bad rows."""

    table: pa.Table
    report: ValidationReport
    rejected: list[RejectedRow] = field(default_factory=list)


@dataclass
class LoadResult:
    """Loaded pairs; in skip mode also the bad rows and where they were written."""

    table: pa.Table
    report: ValidationReport
    rejected: list[RejectedRow] = field(default_factory=list)
    rejected_path: Path | None = None


def load_pairs(
    path: str | os.PathLike,
    *,
    on_bad_row: OnBadRow = "error",
    rejected_path: str | os.PathLike | None = None,
    split: str | None = None,
) -> LoadResult:
    """Load offline preference data into the normalised pair table.

    With `on_bad_row="error"` any problem raises one DataError that lists them all. With
    `"skip"` the valid rows load, and the bad rows with their reasons go to `rejected_path`
    (see `rejected_path_for`) when it is given; a DataError is raised only when no row is valid.
    `split` picks a split of a saved DatasetDict (default: "train", or the only one).
    """
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', not {on_bad_row!r}")
    started = time.perf_counter()

    read = read_pairs(path, split=split)
    report = read.report

    if on_bad_row == "error" and report.problems:
        raise DataError(report.problems)
    if report.rows_valid == 0:
        raise DataError(report.problems)

    written = None
    if read.rejected:
        if rejected_path is not None:
            written = write_rejected(read.rejected, rejected_path)
        unreadable = sum(1 for row in read.rejected if row.row is None)
        logger.warning(
            "skipped %d bad row(s) of %d and %d file-level problem(s) in %s; %s",
            report.rows_rejected,
            report.rows_read,
            unreadable,
            path,
            f"reasons in {written}" if written else "pass rejected_path to keep their reasons",
        )

    logger.info(
        "loaded %d pairs from %s (%d rows read, %d rejected) in %.2fs",
        read.table.num_rows,
        path,
        report.rows_read,
        report.rows_rejected,
        time.perf_counter() - started,
    )
    return LoadResult(read.table, report, read.rejected, written)


def rejected_path_for(output: str | os.PathLike) -> Path:
    """Where the bad rows of a run go: `<output stem>.rejected.jsonl` beside the output."""
    output = Path(output)
    return output.with_name(f"{output.stem}.rejected.jsonl")


def write_rejected(rows: Iterable[RejectedRow], path: str | os.PathLike) -> Path:
    """Write bad rows as JSON Lines, one row with its reasons per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for row in rows:
            out.write(row.to_json() + "\n")
    return path


def read_pairs(path: str | os.PathLike, *, split: str | None = None) -> PairsRead:
    """Read and check every row under `path`; nothing is raised for bad rows.

    1. Find the files (or the saved dataset) and read each into records.
    2. Detect each file's format from its columns and first values.
    3. Normalise each row, or record why it cannot be.
    4. Build one table from the valid rows, with the passthrough columns.
    """
    report = ValidationReport(path=str(path))
    sources, problems = _find_sources(Path(path), split)
    report.problems.extend(problems)
    rejected = [RejectedRow(p.file, None, [p]) for p in problems]

    tables = []
    seen_ids: dict[str, str] = {}
    for source in sources:
        result = _normalise_source(source, seen_ids)
        report.formats[source.name] = result.format
        report.rows_read += len(source.rows)
        report.rows_valid += result.table.num_rows
        report.problems.extend(result.problems)
        rejected.extend(result.rejected)
        tables.append(result.table)

    table = _concat(tables, str(path), report)
    return PairsRead(table, report, rejected)


# Reading containers into records.


@dataclass
class _RawRow:
    row: int
    record: dict[str, Any] | None
    problems: list[Problem] = field(default_factory=list)
    text: str | None = None


@dataclass
class _Source:
    name: str  # shown in problems
    stem: str  # used in fallback pair ids
    container: str
    columns: list[str]
    types: dict[str, pa.DataType]  # Arrow types of the columns, for Arrow containers
    rows: list[_RawRow]


def _find_sources(path: Path, split: str | None) -> tuple[list[_Source], list[Problem]]:
    name = str(path)
    if not path.exists():
        return [], [Problem(name, None, "path", "does not exist")]

    if path.is_file():
        source = _read_file(path)
        return ([], [source]) if isinstance(source, Problem) else ([source], [])

    if (path / "dataset_dict.json").is_file():
        return _find_split(path, split)
    if _is_saved_dataset(path):
        source = _read_saved_dataset(path)
        return ([], [source]) if isinstance(source, Problem) else ([source], [])

    files = sorted(p for p in path.iterdir() if p.suffix in JSONL_SUFFIXES + PARQUET_SUFFIXES)
    if not files:
        reason = "holds no JSON Lines, Parquet or saved dataset files"
        return [], [Problem(name, None, "path", reason)]
    sources, problems = [], []
    for file in files:
        source = _read_file(file)
        (problems if isinstance(source, Problem) else sources).append(source)
    return sources, problems


def _find_split(path: Path, split: str | None) -> tuple[list[_Source], list[Problem]]:
    try:
        splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return [], [Problem(str(path / "dataset_dict.json"), None, "splits", str(error))]
    if split is None:
        split = splits[0] if len(splits) == 1 else "train"
    if split not in splits:
        reason = f"no split {split!r} (splits: {', '.join(splits)})"
        return [], [Problem(str(path), None, "split", reason)]
    source = _read_saved_dataset(path / split)
    return ([], [source]) if isinstance(source, Problem) else ([source], [])


def _is_saved_dataset(path: Path) -> bool:
    return (path / "state.json").is_file() or any(path.glob("data-*.arrow"))


def _read_file(path: Path) -> _Source | Problem:
    if path.suffix in JSONL_SUFFIXES:
        return _read_jsonl(path)
    if path.suffix in PARQUET_SUFFIXES:
        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowException) as error:
            return Problem(str(path), None, "file", f"not readable as Parquet: {error}")
        return _arrow_source(table, str(path), path.stem, "parquet")
    supported = ", ".join(JSONL_SUFFIXES + PARQUET_SUFFIXES)
    # Limitation: a JSON file holding one array of records is not read; convert it to JSON Lines.
    return Problem(str(path), None, "file", f"unsupported file type (supported: {supported})")


def _read_jsonl(path: Path) -> _Source | Problem:
    name = str(path)
    try:
        lines = path.read_bytes().splitlines()
    except OSError as error:
        return Problem(name, None, "file", f"not readable: {error}")

    rows, columns = [], {}
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        # Undecodable bytes survive as lone surrogates, so the check names the field they are in.
        text = raw.decode("utf-8", errors="surrogateescape")
        try:
            record = json.loads(text)
        except ValueError as error:
            problem = Problem(name, number, "row", f"not JSON: {error}")
            rows.append(_RawRow(number, None, [problem], raw.decode("utf-8", errors="replace")))
            continue
        if not isinstance(record, dict):
            reason = f"expected a JSON object, got {_type_name(record)}"
            rows.append(_RawRow(number, None, [Problem(name, number, "row", reason)], text=text))
            continue
        columns.update(dict.fromkeys(record))
        rows.append(_RawRow(number, record))
    return _Source(name, path.stem, "jsonl", list(columns), {}, rows)


def _read_saved_dataset(path: Path) -> _Source | Problem:
    try:
        table = _saved_dataset_table(path)
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as error:
        return Problem(str(path), None, "dataset", f"not readable as a saved dataset: {error}")
    return _arrow_source(table, str(path), path.name, "datasets")


def _saved_dataset_table(path: Path) -> pa.Table:
    """The rows of a `save_to_disk` directory, through `datasets` when it is installed."""
    try:
        import datasets
    except ImportError:
        datasets = None
    if datasets is not None:
        return datasets.load_from_disk(str(path)).with_format("arrow")[:]

    # Without the library: the shards are Arrow IPC streams, listed in order in state.json.
    state_file = path / "state.json"
    if state_file.is_file():
        state = json.loads(state_file.read_text(encoding="utf-8"))
        shards = [path / entry["filename"] for entry in state["_data_files"]]
    else:
        shards = sorted(path.glob("data-*.arrow"))
    if not shards:
        raise ValueError("no data-*.arrow shards")
    return pa.concat_tables(
        [pa.ipc.open_stream(pa.memory_map(str(shard))).read_all() for shard in shards]
    )


def _arrow_source(table: pa.Table, name: str, stem: str, container: str) -> _Source | Problem:
    values = {}
    for column_name, column in zip(table.column_names, table.columns):
        try:
            values[column_name] = _column_values(column)
        except (pa.ArrowException, UnicodeDecodeError) as error:
            return Problem(name, None, column_name, f"column not readable: {error}")
    columns = table.column_names
    rows = [
        _RawRow(index, {c: values[c][index] for c in columns}) for index in range(table.num_rows)
    ]
    types = {c: table.schema.field(c).type for c in columns}
    return _Source(name, stem, container, columns, types, rows)


def _column_values(column: pa.ChunkedArray) -> list[Any]:
    """Python values of a column; invalid UTF-8 in a string column becomes lone surrogates."""
    try:
        return column.to_pylist()
    except (pa.ArrowException, UnicodeDecodeError):
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            raise
    binary = pa.large_binary() if pa.types.is_large_string(column.type) else pa.binary()
    raw = [value for chunk in column.chunks for value in chunk.view(binary).to_pylist()]
    return [None if v is None else v.decode("utf-8", errors="surrogateescape") for v in raw]


# Normalising rows.


@dataclass
class _Kinds:
    """What a file's rows hold: an explicit prompt or not, and text or message lists."""

    container: str
    prompt: Literal["text", "messages"] | None  # None: implicit prompt
    responses: Literal["text", "messages"]

    def describe(self) -> str:
        prompt = "implicit prompt" if self.prompt is None else f"explicit prompt as {self.prompt}"
        return f"{self.container}, {prompt}, responses as {self.responses}"


@dataclass
class _SourceResult:
    format: str
    table: pa.Table
    problems: list[Problem]
    rejected: list[RejectedRow]


def _normalise_source(source: _Source, seen_ids: dict[str, str]) -> _SourceResult:
    kinds = _detect_kinds(source)
    id_column = next((c for c in ID_COLUMNS if c in source.columns), None)

    found = ", ".join(source.columns) or "none"
    problems = [
        Problem(source.name, None, c, f"column missing (columns: {found})")
        for c in (schema.CHOSEN, schema.REJECTED)
        if c not in source.columns
    ]
    if not source.rows:
        problems = [Problem(source.name, None, "rows", "no rows")]
    if problems:
        rejected = [RejectedRow(source.name, None, problems)]
        empty = _normalised_table([], [], source)
        return _SourceResult(kinds.describe(), empty, problems, rejected)

    pairs, kept_rows, problems, rejected = [], [], [], []
    for raw in source.rows:
        row_problems = list(raw.problems)
        pair = None
        if raw.record is not None:
            pair, found = _normalise_row(raw.record, kinds, source.name, raw.row)
            row_problems.extend(found)
            pair_id, found = _pair_id(raw.record, id_column, source, raw.row, seen_ids)
            row_problems.extend(found)
        if row_problems:
            problems.extend(row_problems)
            rejected.append(RejectedRow(source.name, raw.row, row_problems, raw.record, raw.text))
            continue
        seen_ids[pair_id] = f"{source.name}:{raw.row}"
        pairs.append({schema.PAIR_ID: pair_id, **pair})
        kept_rows.append(raw)

    passthrough = [c for c in source.columns if c not in _consumed(kinds, id_column)]
    table = _normalised_table(pairs, kept_rows, source, passthrough)
    return _SourceResult(kinds.describe(), table, problems, rejected)


def _detect_kinds(source: _Source) -> _Kinds:
    def first(column: str) -> Any:
        return next(
            (r.record[column] for r in source.rows if r.record and r.record.get(column)), None
        )

    explicit = schema.PROMPT in source.columns
    prompt = None
    if explicit:
        prompt = "messages" if isinstance(first(schema.PROMPT), list) else "text"
    responses = "messages" if isinstance(first(schema.CHOSEN), list) else "text"
    return _Kinds(source.container, prompt, responses)


def _consumed(kinds: _Kinds, id_column: str | None) -> set[str]:
    consumed = {schema.CHOSEN, schema.REJECTED}
    if kinds.prompt is not None:
        consumed.add(schema.PROMPT)
    if id_column is not None:
        consumed.add(id_column)
    return consumed


def _normalise_row(
    record: dict[str, Any], kinds: _Kinds, file: str, row: int
) -> tuple[dict[str, Any] | None, list[Problem]]:
    """The prompt, prompt messages, chosen and rejected of one row, or why there are none."""

    def problem(where: str, reason: str) -> Problem:
        return Problem(file, row, where, reason)

    undecodable = _undecodable_fields(record)
    problems = [problem(where, "undecodable text (not valid UTF-8)") for where in undecodable]
    if problems:
        return None, problems

    required = [schema.CHOSEN, schema.REJECTED]
    if kinds.prompt is not None:
        required.insert(0, schema.PROMPT)
    values = {}
    for name in required:
        value = record.get(name)
        if value is None:
            problems.append(problem(name, "missing"))
            continue
        value, reason = _as_kind(value, kinds.responses if name != schema.PROMPT else kinds.prompt)
        if reason is not None:
            problems.append(problem(name, reason))
            continue
        values[name] = value
    problems.extend(problem(where, reason) for where, reason in _message_problems(values))
    if problems:
        return None, problems

    if kinds.responses == "messages":
        pair, found = _from_message_responses(values, kinds)
    else:
        pair, found = _from_text_responses(values, kinds)
    problems.extend(problem(where, reason) for where, reason in found)
    if pair is None:
        return None, problems

    for name in (schema.CHOSEN, schema.REJECTED):
        if not pair[name].strip():
            problems.append(problem(name, "empty response"))
    if not pair[schema.PROMPT].strip():
        problems.append(problem(schema.PROMPT, "empty prompt"))
    if pair[schema.CHOSEN] == pair[schema.REJECTED]:
        problems.append(problem(schema.REJECTED, "identical to chosen"))
    return (None, problems) if problems else (pair, [])


def _as_kind(value: Any, kind: str) -> tuple[Any, str | None]:
    """The value if it is of the file's kind (bytes decoded as UTF-8), else why not."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as error:
            return value, f"undecodable text ({error.reason} at byte {error.start})"
    if kind == "text" and not isinstance(value, str):
        return value, f"expected a string like the rest of the file, got {_type_name(value)}"
    if kind == "messages" and not isinstance(value, list):
        return value, f"expected a message list like the rest of the file, got {_type_name(value)}"
    return value, None


def _message_problems(values: dict[str, Any]) -> list[tuple[str, str]]:
    found = []
    for name, messages in values.items():
        if not isinstance(messages, list):
            continue
        if not messages:
            found.append((name, "empty message list"))
        for index, message in enumerate(messages):
            where = f"{name}[{index}]"
            if not isinstance(message, dict):
                found.append((where, f"expected a message object, got {_type_name(message)}"))
                continue
            for key in ("role", "content"):
                if not isinstance(message.get(key), str):
                    # Limitation: content given as a list of parts (multimodal) is not read.
                    reason = "missing" if message.get(key) is None else "expected a string"
                    found.append((f"{where}.{key}", reason))
    return found


def _from_message_responses(
    values: dict[str, Any], kinds: _Kinds
) -> tuple[dict[str, Any] | None, list[tuple[str, str]]]:
    chosen, rejected = values[schema.CHOSEN], values[schema.REJECTED]
    found = []
    for name, messages in ((schema.CHOSEN, chosen), (schema.REJECTED, rejected)):
        role = messages[-1]["role"]
        if role != ASSISTANT:
            found.append((f"{name}[-1].role", f"expected {ASSISTANT!r}, got {role!r}"))
    if found:
        return None, found

    history = _clean_messages(chosen[:-1])
    if _clean_messages(rejected[:-1]) != history:
        if kinds.prompt is None:
            return None, [(f"{schema.CHOSEN}/{schema.REJECTED}", "no shared prefix")]
        return None, [(schema.REJECTED, "conversation before the response differs from chosen's")]

    if kinds.prompt == "text":
        prompt = values[schema.PROMPT]
        messages = history or [{"role": "user", "content": prompt}]
    elif kinds.prompt == "messages":
        given = _clean_messages(values[schema.PROMPT])
        messages = history if history[: len(given)] == given else given + history
        prompt = _plain_text(messages)
    else:
        if not history:
            return None, [(f"{schema.CHOSEN}/{schema.REJECTED}", "no shared prefix")]
        messages = history
        prompt = _plain_text(messages)

    pair = {
        schema.PROMPT: prompt,
        PROMPT_MESSAGES: json.dumps(messages, ensure_ascii=False),
        schema.CHOSEN: chosen[-1]["content"],
        schema.REJECTED: rejected[-1]["content"],
    }
    return pair, []


def _from_text_responses(
    values: dict[str, Any], kinds: _Kinds
) -> tuple[dict[str, Any] | None, list[tuple[str, str]]]:
    chosen, rejected = values[schema.CHOSEN], values[schema.REJECTED]
    messages = None
    if kinds.prompt == "text":
        prompt = values[schema.PROMPT]
    elif kinds.prompt == "messages":
        messages = _clean_messages(values[schema.PROMPT])
        prompt = _plain_text(messages)
    else:
        if chosen == rejected:
            return None, [(schema.REJECTED, "identical to chosen")]
        prompt = implicit_prompt(chosen, rejected)
        if not prompt:
            return None, [(f"{schema.CHOSEN}/{schema.REJECTED}", "no shared prefix")]
        chosen, rejected = chosen[len(prompt) :], rejected[len(prompt) :]

    pair = {
        schema.PROMPT: prompt,
        PROMPT_MESSAGES: None if messages is None else json.dumps(messages, ensure_ascii=False),
        schema.CHOSEN: chosen,
        schema.REJECTED: rejected,
    }
    return pair, []


def implicit_prompt(chosen: str, rejected: str) -> str:
    """The prompt two full texts share: their common prefix, cut back to the last turn marker.

    Cutting at the end of "Assistant:" keeps a word both responses happen to start with in the
    responses, where it belongs.
    """
    prefix = os.path.commonprefix([chosen, rejected])
    marker = prefix.rfind(TURN_MARKER)
    if marker == -1:
        return prefix
    return prefix[: marker + len(TURN_MARKER)]


def _clean_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages without keys that hold nothing (Arrow structs carry every key of every row)."""
    return [{k: v for k, v in m.items() if v is not None} for m in messages]


def _plain_text(messages: list[dict[str, Any]]) -> str:
    """A message list as plain text: the content of a lone message, else `role: content` turns."""
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)


def _undecodable_fields(value: Any, where: str = "") -> list[str]:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return [where]
        return []
    if isinstance(value, dict):
        fields = []
        for key, item in value.items():
            fields.extend(_undecodable_fields(item, f"{where}.{key}" if where else str(key)))
        return fields
    if isinstance(value, list):
        fields = []
        for index, item in enumerate(value):
            fields.extend(_undecodable_fields(item, f"{where}[{index}]"))
        return fields
    return []


def _pair_id(
    record: dict[str, Any],
    id_column: str | None,
    source: _Source,
    row: int,
    seen_ids: dict[str, str],
) -> tuple[str | None, list[Problem]]:
    if id_column is None:
        pair_id, where = f"{source.stem}-{row}", schema.PAIR_ID
    else:
        value, where = record.get(id_column), id_column
        if value is None or value == "":
            return None, [Problem(source.name, row, where, "missing")]
        pair_id = str(value)
    if pair_id in seen_ids:
        return None, [Problem(source.name, row, where, f"duplicate of {seen_ids[pair_id]}")]
    return pair_id, []


# Building tables.


def _normalised_table(
    pairs: list[dict[str, Any]],
    rows: list[_RawRow],
    source: _Source,
    passthrough: Iterable[str] = (),
) -> pa.Table:
    columns = {
        f.name: pa.array([p[f.name] for p in pairs], type=f.type)
        for f in NORMALISED_FIELDS
        if f.name not in (schema.SOURCE, schema.ITERATION)
    }
    columns[schema.SOURCE] = pa.array([schema.SOURCE_OFFLINE] * len(pairs), type=pa.string())
    columns[schema.ITERATION] = pa.array([0] * len(pairs), type=pa.int32())
    table = pa.table({f.name: columns[f.name] for f in NORMALISED_FIELDS})

    for name in passthrough:
        values = [r.record.get(name) for r in rows]
        output_name = name
        if name in RESERVED_COLUMNS or name in table.column_names:
            output_name = RENAMED_PREFIX + name
            logger.warning("%s: column %r passes through as %r", source.name, name, output_name)
        table = table.append_column(output_name, _passthrough_array(values, name, source))
    return table


def _passthrough_array(values: list[Any], name: str, source: _Source) -> pa.Array:
    try:
        return pa.array(values, type=source.types.get(name))
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        logger.warning("%s: column %r has mixed types; it passes as JSON", source.name, name)
        return pa.array(
            [None if v is None else json.dumps(v, default=_json_default) for v in values],
            type=pa.string(),
        )


def _concat(tables: list[pa.Table], name: str, report: ValidationReport) -> pa.Table:
    if not tables:
        return pa.schema(NORMALISED_FIELDS).empty_table()
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except pa.ArrowException as error:
        problem = Problem(name, None, "columns", f"files disagree on column types: {error}")
        report.problems.append(problem)
        report.rows_valid = 0
        return pa.schema(NORMALISED_FIELDS).empty_table()


def _type_name(value: Any) -> str:
    names = {str: "string", list: "list", dict: "object", bool: "boolean", int: "integer"}
    return names.get(type(value), type(value).__name__)


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="backslashreplace")
    return str(value)
