"""Data sources: where records come from and the adapters that turn them into :class:`Conversation`.

Every source, hub dataset or local file/folder, is read through ``datasets.load_dataset`` (so
caching, streaming and parquet/JSON handling come from the library; a local folder in a hub
dataset's layout goes through exactly the call a hub id takes). A per-format adapter converts one
raw record to a list of turns or raises :class:`BadRecord` with a reason to count.
"""

from __future__ import annotations

import codecs
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional

from ..errors import ConfigError
from ..chat import BadRecord, Conversation, Turn

__all__ = [
    "ADAPTERS",
    "DATASET_PRESETS",
    "DataSource",
    "chatterbot_records",
    "iter_chatterbot_texts",
    "load_raw",
    "to_conversation",
]

Format = Literal["messages", "sharegpt", "prompt_response", "chatterbot"]

# Role names seen in the wild -> our three roles. Sources may extend this with `role_map`.
DEFAULT_ROLE_MAP = {
    "system": "system",
    "user": "user",
    "human": "user",
    "prompter": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",  # older GrandMaster-PRO-MAX revisions
    "model": "assistant",
}

# Defaults taken from the dataset cards; they fill the fields a source leaves unset.
#   allenai/tulu-3-sft-mixture: columns id, messages (list of {role, content}), source; English.
#   Vikhrmodels/GrandMaster-PRO-MAX: a `conversation` list of {role, content}; Russian (some English).
DATASET_PRESETS: dict[str, dict[str, Any]] = {
    "allenai/tulu-3-sft-mixture": {"format": "messages", "column": "messages", "language": "en"},
    "Vikhrmodels/GrandMaster-PRO-MAX": {"format": "messages", "column": "conversation", "language": "ru"},
}

# Per-format defaults of (message-list column, role key, content key).
_FORMAT_KEYS = {"messages": ("messages", "role", "content"), "sharegpt": ("conversations", "from", "value")}

# chatterbot-corpus folder names for the ISO codes we use as `language`.
CHATTERBOT_LANGUAGES = {"en": "english", "ru": "russian", "uk": "ukrainian", "de": "german", "fr": "french"}

log = logging.getLogger(__name__)

_LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def _infer_preset(path: str) -> Optional[str]:
    """The preset whose hub id is ``path``, or whose dataset name is the folder's name (a local snapshot)."""
    name = Path(path.rstrip("/")).name.lower()
    for hub_id in DATASET_PRESETS:
        if path.lower() == hub_id.lower() or name == hub_id.split("/")[1].lower():
            return hub_id
    return None


@dataclass
class DataSource:
    """One dataset in the training mix.

    Args:
        path: a hub dataset id (``allenai/tulu-3-sft-mixture``), a local file (``.jsonl``, ``.json``,
            ``.parquet``, ``.csv``), a local folder of such files (read like a hub dataset, splits
            from file names), or ``chatterbot`` for the chatterbot-corpus package.
        format: record schema: ``messages`` (OpenAI list of role/content), ``sharegpt``
            (``conversations`` of from/value), ``prompt_response`` (two text columns), ``chatterbot``.
        language: ISO code carried by every example (metrics are split by it); default from the
            preset, else ``en``.
        weight: relative sampling weight in the mix (normalised over the sources).
        name: label in logs and metrics (default: derived from ``path``).
        preset: a key of ``DATASET_PRESETS`` whose dataset-card defaults (column, language) fill the
            unset fields; default: inferred from ``path`` (the hub id, or a folder with the
            dataset's name such as ``data/GrandMaster-PRO-MAX``).
        subset: dataset configuration name for hub datasets.
        split: split to read.
        revision: hub revision (commit, tag or branch) to pin the data.
        column: field holding the message list (default: preset, else ``messages`` /
            ``conversations``).
        role_key / content_key: keys inside each message (default ``role``/``content``, ShareGPT
            ``from``/``value``).
        role_map: extra role-name mappings, e.g. ``{"ai": "assistant"}`` (case-insensitive).
        prompt_column / response_column / system_column: for ``prompt_response``.
        system_prompt: a system message put before the dialogs of this source that have none
            (sample with the same system message to match training).
        json_field: for a ``.json`` file whose records sit under one key (``{"data": [...]}``).
        max_samples: cap on records read from this source (before the validation split).
        val_size: held-out validation records: a count (>= 1) or a fraction (< 1) of the records.
            Streaming sources need a count (their length is unknown).
        streaming: stream the records instead of downloading and caching them whole.
        categories: chatterbot categories (file names) to read (default: all of the language).
    """

    path: str
    format: Format = "messages"
    language: Optional[str] = None
    weight: float = 1.0
    name: Optional[str] = None
    preset: Optional[str] = None
    subset: Optional[str] = None
    split: str = "train"
    revision: Optional[str] = None
    column: Optional[str] = None
    role_key: Optional[str] = None
    content_key: Optional[str] = None
    role_map: dict[str, str] = field(default_factory=dict)
    prompt_column: str = "prompt"
    response_column: str = "response"
    system_column: Optional[str] = None
    system_prompt: Optional[str] = None
    json_field: Optional[str] = None
    max_samples: Optional[int] = None
    val_size: float = 0.02
    streaming: bool = False
    categories: Optional[list[str]] = None

    def __post_init__(self) -> None:
        where = f"data source {self.path!r}"
        if self.path == "chatterbot" and not os.path.exists(self.path):
            self.format = "chatterbot"
        if self.format not in ADAPTERS:
            raise ConfigError(f"{where}: unknown format {self.format!r}; use one of {sorted(ADAPTERS)}")
        if self.preset is not None and self.preset not in DATASET_PRESETS:
            raise ConfigError(f"{where}: unknown preset {self.preset!r}; known: {sorted(DATASET_PRESETS)}")
        preset = DATASET_PRESETS.get(self.preset or _infer_preset(self.path) or "", {})
        if preset and self.format == preset["format"]:
            self.column = self.column or preset.get("column")
        self.language = self.language or preset.get("language", "en")
        if not math.isfinite(self.weight) or self.weight <= 0:
            raise ConfigError(f"{where}: weight must be a finite number > 0, got {self.weight}")
        fractional_count = self.val_size >= 1 and self.val_size != int(self.val_size)
        if not math.isfinite(self.val_size) or self.val_size < 0 or fractional_count:
            raise ConfigError(f"{where}: val_size must be a count >= 0 or a fraction < 1, "
                              f"got {self.val_size}")
        if self.streaming and 0 < self.val_size < 1:
            raise ConfigError(
                f"{where}: a streaming source has no known length, so val_size must be a record count "
                f"(e.g. val_size: 500), not the fraction {self.val_size}"
            )
        if self.max_samples is not None and self.max_samples <= 0:
            raise ConfigError(f"{where}: max_samples must be > 0, got {self.max_samples}")

    @property
    def label(self) -> str:
        """Name used in logs, metrics and skip summaries."""
        if self.name:
            return self.name
        if self.format == "chatterbot":
            return f"chatterbot-{self.language}"
        return Path(self.path.rstrip("/")).stem if os.path.exists(self.path) else self.path

    def keys(self) -> tuple[str, str, str]:
        """(message-list column, role key, content key) for list formats."""
        column, role, content = _FORMAT_KEYS.get(self.format, ("messages", "role", "content"))
        return self.column or column, self.role_key or role, self.content_key or content

    def num_val(self, num_records: int) -> int:
        """Records held out for validation from a source of ``num_records`` (always leaves one to train)."""
        n = int(self.val_size) if self.val_size >= 1 else int(round(self.val_size * num_records))
        return max(0, min(n, num_records - 1))


def _role_map(source: DataSource) -> dict[str, str]:
    return {**DEFAULT_ROLE_MAP, **{k.lower(): v for k, v in source.role_map.items()}}


def _message_list(record: dict, source: DataSource) -> list[Turn]:
    column, role_key, content_key = source.keys()
    if column not in record:
        raise BadRecord("missing_column", f"no {column!r} field (set the source's `column`)")
    messages = record[column]
    if messages is None:
        raise BadRecord("missing_column", f"{column!r} is null")
    if not isinstance(messages, (list, tuple)):
        raise BadRecord("malformed_messages", f"{column!r} is a {type(messages).__name__}, not a list")
    role_map = _role_map(source)
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadRecord("malformed_messages", f"message {i} is a {type(m).__name__}, not an object")
        raw_role = m.get(role_key)
        if raw_role is None:
            raise BadRecord("missing_role", f"message {i} has no {role_key!r}")
        role = role_map.get(raw_role.lower()) if isinstance(raw_role, str) else None
        if role is None:
            raise BadRecord("unknown_role", f"message {i} has role {raw_role!r} (map it with `role_map`)")
        content = m.get(content_key)
        if content is None:
            raise BadRecord("missing_content", f"message {i} ({role}) has no {content_key!r}")
        turns.append(Turn(role, content))
    return turns


def _prompt_response(record: dict, source: DataSource) -> list[Turn]:
    turns = []
    if source.system_column and isinstance(record.get(source.system_column),
                                           str) and record[source.system_column].strip():
        turns.append(Turn("system", record[source.system_column]))
    for column, role in ((source.prompt_column, "user"), (source.response_column, "assistant")):
        if column not in record:
            raise BadRecord("missing_column", f"no {column!r} field")
        if record[column] is None:
            raise BadRecord("missing_content", f"{column!r} is null")
        turns.append(Turn(role, record[column]))
    return turns


def _chatterbot(record: dict, source: DataSource) -> list[Turn]:
    # chatterbot dialogs are alternating statements; the first speaker is taken as the user.
    utterances = list(record["utterances"])
    if len(utterances) % 2:
        utterances = utterances[:-1]  # a trailing statement has no answer
    return [Turn("user" if i % 2 == 0 else "assistant", u) for i, u in enumerate(utterances)]


ADAPTERS: dict[str, Callable[[dict, DataSource], list[Turn]]] = {
    "messages": _message_list,
    "sharegpt": _message_list,
    "prompt_response": _prompt_response,
    "chatterbot": _chatterbot,
}


def to_conversation(record: dict, source: DataSource, index: int = -1,
                    label: Optional[str] = None) -> Conversation:
    """Adapt one raw record; raises :class:`BadRecord` (with a countable reason) if unusable.

    ``label`` saves recomputing ``source.label`` (a file-system check) per record.
    """
    turns = ADAPTERS[source.format](record, source)
    if source.system_prompt and not any(t.role == "system" for t in turns):
        turns = [Turn("system", source.system_prompt)] + turns
    return Conversation(turns, source=label or source.label, language=source.language, index=index).validate()


def _chatterbot_dir(language: str) -> Path:
    try:
        import chatterbot_corpus
    except ImportError as err:  # pragma: no cover - it is a hard dependency
        raise ImportError("the chatterbot source needs `pip install chatterbot-corpus`") from err
    folder = CHATTERBOT_LANGUAGES.get(language, language)
    path = Path(chatterbot_corpus.__file__).parent / "data" / folder
    if not path.is_dir():
        raise ConfigError(f"chatterbot-corpus has no language {language!r} (looked for {path})")
    return path


def chatterbot_records(language: str, categories: Optional[list[str]] = None) -> list[dict]:
    """Raw dialogs of the chatterbot-corpus package for one language, in file order."""
    import yaml

    folder = _chatterbot_dir(language)
    files = sorted(folder.glob("*.yml"))
    if categories:
        missing = set(categories) - {f.stem for f in files}
        if missing:
            raise ConfigError(f"chatterbot-corpus {language!r} has no categories {sorted(missing)}; "
                              f"known: {sorted(f.stem for f in files)}")
        files = [f for f in files if f.stem in categories]
    records = []
    for file in files:
        # BaseLoader keeps every scalar as written (a "yes" or "42" line stays text, not True/42).
        data = yaml.load(file.read_text(encoding="utf-8"), Loader=yaml.BaseLoader) or {}
        for dialog in data.get("conversations") or []:
            records.append({"utterances": list(dialog) if isinstance(dialog, list) else [dialog],
                            "category": file.stem})
    return records


def iter_chatterbot_texts(languages: list[str]) -> Iterator[str]:
    """Every utterance of the chatterbot corpus for ``languages`` (for tokenizer training)."""
    for lang in languages:
        for rec in chatterbot_records(lang):
            yield from (u for u in rec["utterances"] if isinstance(u, str))


def _first_bad_utf8(path: Path) -> Optional[tuple[int, int]]:
    """``(byte offset, line number)`` of the first byte sequence in ``path`` that is not UTF-8, or None."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, line = 0, 1
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                # The decoder may hold back up to 3 bytes of an unfinished sequence from the last chunk.
                pending = len(decoder.getstate()[0])
                start = max(0, offset + err.start - pending)
                handle.seek(0)
                return start, handle.read(start).count(b"\n") + 1
            offset += len(chunk)
            line += chunk.count(b"\n")
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return offset - len(decoder.getstate()[0]), line
    return None


def _scan_jsonl(path: Path, where: str, strict: bool) -> tuple[list[dict], list[tuple[int, int]]]:
    """Parse a JSON Lines file line by line: ``(records, [(line, byte offset)] of non-UTF-8 lines)``.

    A line that is not JSON, or not an object, is an error naming it; a non-UTF-8 line is an error
    in strict mode and is returned as skipped otherwise.
    """
    records, bad = [], []
    offset = 0
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            start, offset = offset, offset + len(raw)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                if strict:
                    raise ConfigError(f"{where}: line {lineno} is not valid UTF-8 (byte offset "
                                      f"{start + err.start}); re-encode the file as UTF-8, or set "
                                      "data.strict=false to skip such records")
                bad.append((lineno, start + err.start))
                continue
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{where}: line {lineno} is not valid JSON ({err.msg} at column "
                                  f"{err.colno}); fix or remove that line") from None
            if not isinstance(record, dict):
                raise ConfigError(f"{where}: line {lineno} is a JSON {type(record).__name__}, not an object "
                                  "(one record object per line)")
            records.append(record)
    return records, bad


def _without_non_utf8(path: Path, where: str, strict: bool,
                      on_skip: Optional[Callable[[str, int], None]]) -> Any:
    """A local file holding bytes that are not UTF-8 (found up front: Arrow's JSON reader may accept
    them and fail only when a record is read, mid-tokenisation). A JSON Lines file is read without
    those lines, counted as skipped ``non_utf8`` records (an error naming line and byte offset under
    ``strict``); any other file is an error naming the byte offset."""
    import datasets

    if path.suffix.lower() != ".jsonl":
        offset, line = _first_bad_utf8(path)
        raise ConfigError(f"{where}: not valid UTF-8 at byte offset {offset} (line {line}); re-encode the "
                          "file as UTF-8")
    records, bad = _scan_jsonl(path, where, strict)
    if not records:
        raise ConfigError(f"{where}: the file holds no records that are valid UTF-8")
    if on_skip is not None:
        on_skip("non_utf8", len(bad))
    log.warning("data: %s: skipped %d record(s) that are not valid UTF-8 (first: line %d, byte offset %d)",
                where, len(bad), *bad[0])
    try:
        return datasets.Dataset.from_list(records)
    except Exception as err:  # records whose fields disagree in type
        raise ConfigError(f"{where}: the records do not share one schema ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''})") from None


def _load_failure(path: Path, where: str, err: BaseException) -> ConfigError:
    """One line saying why ``datasets`` could not read a local (UTF-8) file: the first line that is
    not JSON in a JSON Lines file, an empty file, or the reader's own message."""
    if path.suffix.lower() == ".jsonl":
        records, _ = _scan_jsonl(path, where, strict=True)  # raises on the first line that is not JSON
        if not records:
            return ConfigError(f"{where}: the file holds no records (one JSON object per line)")
    if isinstance(err, StopIteration) or "corresponds to no data" in str(err):
        return ConfigError(f"{where}: the file holds no records")
    cause = err.__cause__ or err.__context__ or err
    message = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    return ConfigError(f"{where} could not be read ({type(cause).__name__}: {message})")


def _load_arguments(source: DataSource, path: Path, where: str) -> tuple[tuple, dict[str, Any]]:
    """The ``datasets.load_dataset`` arguments of a local file, a local folder or a hub id."""
    if path.is_file():
        builder = _LOCAL_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ConfigError(f"{where}: unsupported file type {path.suffix!r}; use one of "
                              f"{sorted(_LOCAL_BUILDERS)}")
        if path.stat().st_size == 0:
            raise ConfigError(f"{where}: the file is empty (no records)")
        kwargs: dict[str, Any] = {"data_files": str(path), "split": "train"}
        if source.json_field:
            kwargs["field"] = source.json_field
        return (builder,), kwargs
    if path.is_dir() or source.path.count("/") == 1:
        return (source.path, source.subset), {"split": source.split, "revision": source.revision}
    raise ConfigError(f"{where}: no such file or folder, and not a hub id (owner/name)")


def _load_dataset(source: DataSource, path: Path, where: str, cache_dir: Optional[str], args: tuple,
                  kwargs: dict[str, Any]) -> Any:
    """``datasets.load_dataset``, with a one-line :class:`ConfigError` for what a user can fix."""
    import datasets

    try:
        return datasets.load_dataset(*args, streaming=source.streaming, cache_dir=cache_dir, **kwargs)
    except Exception as err:
        if path.is_file() and not source.streaming:  # say what is wrong with the file, in one line
            raise _load_failure(path, where, err) from err
        if isinstance(err, (OSError, ValueError)):  # not found, offline, unknown split, unparsable file
            raise ConfigError(
                f"{where} could not be loaded ({err.__class__.__name__}: {err}). Check the path, subset "
                "and split; hub datasets need network access or a filled cache (HF_HUB_OFFLINE=1 uses it)."
            ) from err
        raise


def load_raw(source: DataSource, cache_dir: Optional[str] = None, strict: bool = False,
             on_skip: Optional[Callable[[str, int], None]] = None) -> Any:
    """The raw records of a source: a ``datasets.Dataset``, or an ``IterableDataset`` if streaming.

    ``max_samples`` is applied here (the first records), before any validation split. A local file
    that ``datasets`` cannot read is a one-line :class:`ConfigError` naming the file and line
    (empty file, a line that is not JSON, bytes that are not UTF-8); in a JSON Lines file, records
    that are not UTF-8 are skipped and reported as ``on_skip("non_utf8", count)`` unless ``strict``.
    """
    import datasets

    where = f"data source {source.label!r} ({source.path})"
    path = Path(source.path)
    if source.format == "chatterbot":
        ds = datasets.Dataset.from_list(chatterbot_records(source.language, source.categories))
        ds = ds.to_iterable_dataset() if source.streaming else ds
    else:
        args, kwargs = _load_arguments(source, path, where)
        if path.is_file() and args[0] in ("json", "csv") and _first_bad_utf8(path) is not None:
            ds = _without_non_utf8(path, where, strict, on_skip)
            ds = ds.to_iterable_dataset() if source.streaming else ds
        else:
            ds = _load_dataset(source, path, where, cache_dir, args, kwargs)
    if source.max_samples is not None:
        ds = ds.take(source.max_samples) if source.streaming else ds.select(range(min(source.max_samples,
                                                                                      len(ds))))
    return ds
