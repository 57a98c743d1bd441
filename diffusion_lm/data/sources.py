"""Data sources: where records come from and the adapters that turn them into :class:`Conversation`.

Every source, hub dataset or local file, is read through ``datasets.load_dataset`` (so caching,
streaming and parquet/JSON handling come from the library); a per-format adapter converts one raw
record to a :class:`Conversation` or raises :class:`BadRecord` with a reason to count.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional

from ..errors import ConfigError
from .conversation import BadRecord, Conversation, Turn

__all__ = ["DataSource", "ADAPTERS", "to_conversation", "load_raw", "iter_chatterbot_texts", "chatterbot_records"]

Format = Literal["messages", "sharegpt", "prompt_response", "chatterbot"]

# Role names seen in the wild -> our three roles. Sources may extend this with `role_map`.
DEFAULT_ROLE_MAP = {
    "system": "system",
    "user": "user",
    "human": "user",
    "prompter": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
}

# chatterbot-corpus folder names for the ISO codes we use as `language`.
CHATTERBOT_LANGUAGES = {"en": "english", "ru": "russian", "uk": "ukrainian", "de": "german", "fr": "french"}


@dataclass
class DataSource:
    """One dataset in the training mix.

    Args:
        path: a hub dataset id (``allenai/tulu-3-sft-mixture``), a local file (``.jsonl``, ``.json``,
            ``.parquet``, ``.csv``) or folder, or ``chatterbot`` for the chatterbot-corpus package.
        format: record schema: ``messages`` (OpenAI list of role/content), ``sharegpt``
            (``conversations`` of from/value), ``prompt_response`` (two text columns), ``chatterbot``.
        language: ISO code carried by every example (metrics are split by it).
        weight: relative sampling weight in the mix.
        name: label in logs and metrics (default: derived from ``path``).
        subset: dataset configuration name for hub datasets.
        split: split to read.
        column: column holding the message list (default ``messages`` / ``conversations``).
        role_key / content_key: keys inside each message (default ``role``/``content``, ShareGPT
            ``from``/``value``).
        role_map: extra role-name mappings, e.g. ``{"ai": "assistant"}``.
        prompt_column / response_column / system_column: for ``prompt_response``.
        max_samples: cap on records read from this source (before the validation split).
        val_size: held-out validation records (int) or fraction (float < 1).
        streaming: stream a large hub dataset instead of downloading it whole.
        categories: chatterbot categories to read (default: all of the language).
    """

    path: str
    format: Format = "messages"
    language: str = "en"
    weight: float = 1.0
    name: Optional[str] = None
    subset: Optional[str] = None
    split: str = "train"
    column: Optional[str] = None
    role_key: Optional[str] = None
    content_key: Optional[str] = None
    role_map: dict[str, str] = field(default_factory=dict)
    prompt_column: str = "prompt"
    response_column: str = "response"
    system_column: Optional[str] = None
    max_samples: Optional[int] = None
    val_size: float = 0.02
    streaming: bool = False
    categories: Optional[list[str]] = None

    def __post_init__(self) -> None:
        if self.weight <= 0:
            raise ConfigError(f"data source {self.path!r}: weight must be > 0, got {self.weight}")
        if self.val_size < 0:
            raise ConfigError(f"data source {self.path!r}: val_size must be >= 0, got {self.val_size}")

    @property
    def label(self) -> str:
        """Name used in logs and skip summaries."""
        if self.name:
            return self.name
        if self.format == "chatterbot":
            return f"chatterbot-{self.language}"
        return Path(self.path).stem if os.path.exists(self.path) else self.path


def _roles(source: DataSource) -> dict[str, str]:
    return {**DEFAULT_ROLE_MAP, **{k.lower(): v for k, v in source.role_map.items()}}


def _message_list(record: dict, source: DataSource, default_column: str, role_key: str, content_key: str) -> list[Turn]:
    column = source.column or default_column
    messages = record.get(column)
    if messages is None:
        raise BadRecord("missing_column", f"no {column!r} field (set the source's `column`)")
    if not isinstance(messages, (list, tuple)):
        raise BadRecord("malformed_messages", f"{column!r} is a {type(messages).__name__}, not a list")
    role_map = _roles(source)
    turns = []
    for m in messages:
        if not isinstance(m, dict) or (source.role_key or role_key) not in m:
            raise BadRecord("malformed_message", "a message without a role field")
        raw_role = m[source.role_key or role_key]
        role = role_map.get(str(raw_role).lower()) if raw_role is not None else None
        if role is None:
            raise BadRecord("unknown_role", repr(raw_role))
        content = m.get(source.content_key or content_key)
        if not isinstance(content, str):
            raise BadRecord("non_string_content", f"{role} content is {type(content).__name__}")
        turns.append(Turn(role, content))
    return turns


def _messages(record: dict, source: DataSource) -> list[Turn]:
    return _message_list(record, source, "messages", "role", "content")


def _sharegpt(record: dict, source: DataSource) -> list[Turn]:
    return _message_list(record, source, "conversations", "from", "value")


def _prompt_response(record: dict, source: DataSource) -> list[Turn]:
    turns = []
    if source.system_column and record.get(source.system_column):
        turns.append(Turn("system", record[source.system_column]))
    for column, role in ((source.prompt_column, "user"), (source.response_column, "assistant")):
        if column not in record:
            raise BadRecord("missing_column", f"no {column!r} field")
        if not isinstance(record[column], str):
            raise BadRecord("non_string_content", f"{column!r} is {type(record[column]).__name__}")
        turns.append(Turn(role, record[column]))
    return turns


def _chatterbot(record: dict, source: DataSource) -> list[Turn]:
    # chatterbot dialogs are alternating utterances; the first speaker is the user.
    utterances = record["utterances"]
    if len(utterances) % 2:
        utterances = utterances[:-1]  # a trailing user line has no answer
    turns = []
    for i, u in enumerate(utterances):
        if not isinstance(u, str):
            raise BadRecord("non_string_content", f"utterance {i} is {type(u).__name__}")
        turns.append(Turn("user" if i % 2 == 0 else "assistant", u))
    return turns


ADAPTERS: dict[str, Callable[[dict, DataSource], list[Turn]]] = {
    "messages": _messages,
    "sharegpt": _sharegpt,
    "prompt_response": _prompt_response,
    "chatterbot": _chatterbot,
}


def to_conversation(record: dict, source: DataSource, index: int = -1) -> Conversation:
    """Adapt one raw record; raises :class:`BadRecord` (with a countable reason) if unusable."""
    turns = ADAPTERS[source.format](record, source)
    return Conversation(turns, source=source.label, language=source.language, index=index).validate()


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

    records = []
    for file in sorted(_chatterbot_dir(language).glob("*.yml")):
        if categories and file.stem not in categories:
            continue
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        for dialog in data.get("conversations") or []:
            records.append({"utterances": [str(u) if not isinstance(u, str) else u for u in dialog], "category": file.stem})
    return records


def iter_chatterbot_texts(languages: list[str]) -> Iterator[str]:
    """Every utterance of the chatterbot corpus for ``languages`` (for tokenizer training)."""
    for lang in languages:
        for rec in chatterbot_records(lang):
            yield from rec["utterances"]


_LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def load_raw(source: DataSource) -> Any:
    """The raw records of a source as a ``datasets.Dataset`` (or ``IterableDataset`` if streaming)."""
    import datasets

    if source.format == "chatterbot":
        return datasets.Dataset.from_list(chatterbot_records(source.language, source.categories))
    path = Path(source.path)
    if path.is_file():
        builder = _LOCAL_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ConfigError(
                f"data source {source.path!r}: unsupported file type {path.suffix!r}; use one of {sorted(_LOCAL_BUILDERS)}"
            )
        ds = datasets.load_dataset(builder, data_files=str(path), split="train", streaming=source.streaming)
    elif path.is_dir() or "/" in source.path:
        try:
            ds = datasets.load_dataset(source.path, source.subset, split=source.split, streaming=source.streaming)
        except FileNotFoundError as err:
            raise ConfigError(
                f"data source {source.path!r}: not a local file or folder, and the hub dataset could not be "
                f"loaded ({err}). Check the path, or log in / set HF_HUB_OFFLINE=0 for hub datasets."
            ) from err
    else:
        raise ConfigError(f"data source {source.path!r}: no such file or folder, and not a hub id (owner/name)")
    if source.max_samples is not None:
        ds = ds.take(source.max_samples) if source.streaming else ds.select(range(min(source.max_samples, len(ds))))
    return ds
