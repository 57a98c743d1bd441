"""Chat turns, conversations and the chat template: the ONE code path from turns to token ids.

Training, sampling, export and evaluation all call :class:`ChatTemplate`, so the prompt the sampler
builds for a conversation is token-for-token the prefix used in training (dLLM tokenised the prompt
separately and assumed it was a prefix; its benchmark path added [CLS]/[SEP] training never saw).

Layout (ids are built per segment, never by re-tokenising a rendered string)::

    [BOS] <header(user)> <user text> [EOS] <header(assistant)> <answer text> [EOS] [PAD] ...
    '--------------------- prompt (never noised) ---------------------'  '-- answer + filler --'

``BOS`` is the tokenizer's [CLS] (or its BOS token); ``EOS`` ends every turn and is the explicit
end-of-answer token: the tokenizer's EOS token if it has one distinct from PAD, else [SEP]. It is
never PAD (dLLM aliased EOS to PAD for ModernBERT and the model learned to fill with it).

Plain Python over a Hugging Face tokenizer (no torch, no Lightning): the model, the data pipeline,
the pipeline functions and the callbacks all build on it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Optional, Sequence

from .errors import ConfigError

__all__ = [
    "BadRecord",
    "ChatTemplate",
    "Conversation",
    "DEFAULT_LANGUAGES",
    "DEFAULT_ROLE_HEADERS",
    "DEFAULT_VALIDATION_PROMPTS",
    "ROLES",
    "Turn",
    "ValidationPrompt",
    "special_ids",
]

ROLES = ("system", "user", "assistant")

# The languages of the project's mix and of its bundled defaults (validation prompts, the chatterbot
# sample of `diffusion-lm check`, the model card of an export without a data summary).
DEFAULT_LANGUAGES = ("en", "ru")


class BadRecord(ValueError):
    """A source record (or one answer of it) that cannot become a training example.

    ``reason`` is a key of :data:`~diffusion_lm.data.skips.SKIP_REASONS` (the counter key); ``detail`` says
    what was found.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # keep reason/detail when raised inside a datasets.map worker process
        return (type(self), (self.reason, self.detail))


@dataclass(frozen=True)
class Turn:
    """One message: ``role`` is ``system``, ``user`` or ``assistant``."""

    role: str
    content: str


@dataclass
class Conversation:
    """A dialog plus where it came from (for per-source and per-language metrics).

    Args:
        turns: the messages in order.
        source: label of the data source (``DataSource.label``).
        language: ISO code of the source; metrics are split by it.
        index: record index inside the source (``-1`` when not from a source).
        meta: free-form extras.
    """

    turns: list[Turn]
    source: str = ""
    language: str = ""
    index: int = -1
    meta: dict = field(default_factory=dict)

    def validate(self) -> "Conversation":
        """Raise :class:`BadRecord` unless this is a usable dialog ending with an assistant answer.

        Dialogs with fewer than two messages are rejected here with a counted reason instead of
        reaching the template (dLLM's chat template crashed on them).
        """
        if not self.turns:
            raise BadRecord("empty_conversation")
        for i, turn in enumerate(self.turns):
            if turn.role not in ROLES:
                raise BadRecord("unknown_role", f"message {i} has role {turn.role!r}")
            if turn.content is None:
                raise BadRecord("missing_content", f"message {i} ({turn.role})")
            if not isinstance(turn.content, str):
                raise BadRecord("non_string_content",
                                f"message {i} ({turn.role}) is {type(turn.content).__name__}")
            if not turn.content.strip():
                raise BadRecord("empty_content", f"message {i} ({turn.role})")
        if not any(t.role == "assistant" for t in self.turns):
            raise BadRecord("no_assistant_turn", f"roles: {[t.role for t in self.turns]}")
        if self.turns[-1].role != "assistant":
            raise BadRecord("last_turn_not_assistant", f"last role is {self.turns[-1].role!r}")
        if not any(t.role == "user" for t in self.turns):
            raise BadRecord("no_user_turn", f"roles: {[t.role for t in self.turns]}")
        return self

    def answer_indices(self, which: str = "all") -> list[int]:
        """Indices of the assistant turns to train on: every one preceded by a user turn, or the ``last``."""
        seen_user, targets = False, []
        for i, turn in enumerate(self.turns):
            seen_user = seen_user or turn.role == "user"
            if turn.role == "assistant" and seen_user:
                targets.append(i)
        return targets[-1:] if which == "last" else targets

    @property
    def first_user_text(self) -> Optional[str]:
        """The first user message (handy for logging samples)."""
        return next((t.content for t in self.turns if t.role == "user"), None)


DEFAULT_ROLE_HEADERS = {"system": "System:", "user": "User:", "assistant": "Assistant:"}


def special_ids(tokenizer) -> dict[str, int | None]:
    """The ids the framework needs: mask, pad, eos (end of answer/turn) and bos (or None).

    Raises a ValueError naming the missing token and the fix when the tokenizer has no mask or pad
    token (the backbone loader adds them for families that lack one, e.g. T5).
    """
    name = getattr(tokenizer, "name_or_path", "the tokenizer")
    if tokenizer.mask_token_id is None:
        raise ConfigError(
            f"{name} has no mask token. Load the backbone through diffusion_lm.backbone.load_backbone "
            "(it adds [MASK] and resizes the embeddings) or add one with "
            "tokenizer.add_special_tokens({'mask_token': '[MASK]'})."
        )
    pad = tokenizer.pad_token_id
    eos = tokenizer.eos_token_id
    if eos is None or eos == pad:
        eos = tokenizer.sep_token_id
    if eos is None:
        raise ConfigError(
            f"{name} has neither an EOS nor a SEP token distinct from PAD; add one, e.g. "
            "tokenizer.add_special_tokens({'eos_token': '</s>'})."
        )
    if pad is None:
        raise ConfigError(f"{name} has no pad token; add one, e.g. "
                          f"tokenizer.add_special_tokens({{'pad_token': '[PAD]'}}).")
    if eos == pad:
        raise ConfigError(f"{name}: the end-of-answer token equals the pad token ({pad}); give the tokenizer "
                          "a distinct EOS.")
    bos = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    return {"mask": tokenizer.mask_token_id, "pad": pad, "eos": eos, "bos": bos}


class ChatTemplate:
    """Builds prompt and answer ids from turns for one tokenizer.

    Args:
        tokenizer: a Hugging Face tokenizer with mask and pad tokens.
        role_headers: text put before each turn's content, per role (plain text, so every tokenizer
            family works without new tokens).
        add_bos: start the sequence with [CLS]/BOS, as the encoder saw in pretraining.
    """

    def __init__(self, tokenizer, role_headers: dict[str, str] | None = None, add_bos: bool = True) -> None:
        self.tokenizer = tokenizer
        self.role_headers = dict(DEFAULT_ROLE_HEADERS, **(role_headers or {}))
        self.add_bos = add_bos
        ids = special_ids(tokenizer)
        self.mask_id: int = ids["mask"]
        self.pad_id: int = ids["pad"]
        self.eos_id: int = ids["eos"]
        self.bos_id: int | None = ids["bos"] if add_bos else None
        self._header_ids = {role: self.encode_text(h) if h else [] for role, h in self.role_headers.items()}
        self._fingerprint: Optional[str] = None

    def encode_text(self, text: str) -> list[int]:
        """Token ids of plain text, with no special tokens: a special token's spelling inside the text
        (``[MASK]``, ``[SEP]``) is tokenised as the characters it is made of, so user or training text
        never injects a mask, end or pad token (an infill text with a literal ``[MASK]`` gets no extra
        hole)."""
        # verbose=False: no "longer than the model maximum" warning; length limits are applied on ids.
        return list(self.tokenizer(text, add_special_tokens=False, split_special_tokens=True,
                                   verbose=False)["input_ids"])

    def encode_texts(self, texts: Sequence[str]) -> list[list[int]]:
        """``encode_text`` of many texts in one tokenizer call (the same ids, faster)."""
        if not texts:
            return []
        out = self.tokenizer(list(texts), add_special_tokens=False, split_special_tokens=True, verbose=False)
        return [list(ids) for ids in out["input_ids"]]

    def header_ids(self, role: str) -> list[int]:
        """Ids of the role header (e.g. ``Assistant:``)."""
        return self._header_ids[role]

    def turn_ids(self, turn: Turn) -> list[int]:
        """A complete context turn: header, content, end-of-turn token."""
        return self._header_ids[turn.role] + self.encode_text(turn.content) + [self.eos_id]

    def context_ids(self, turns: Sequence[Turn]) -> list[int]:
        """BOS plus every turn of ``turns`` in full."""
        ids = [self.bos_id] if self.bos_id is not None else []
        for turn in turns:
            ids.extend(self.turn_ids(turn))
        return ids

    def prompt_ids(self, turns: Sequence[Turn]) -> list[int]:
        """The prompt for the next assistant answer: context plus the assistant header."""
        return self.context_ids(turns) + self._header_ids["assistant"]

    def answer_ids(self, content: str) -> list[int]:
        """The answer segment that is noised in training: content plus the end-of-answer token."""
        return self.encode_text(content) + [self.eos_id]

    def example(self, turns: Sequence[Turn], answer_index: int) -> tuple[list[int], list[int]]:
        """(prompt ids, answer ids) for training on the assistant turn ``turns[answer_index]``."""
        return self.examples(turns, [answer_index])[0]

    def examples(
        self,
        turns: Sequence[Turn],
        answer_indices: Sequence[int],
        encoded: Optional[Sequence[Sequence[int]]] = None,
    ) -> list[tuple[list[int], list[int]]]:
        """(prompt ids, answer ids) for each assistant turn in ``answer_indices``, each with its own context.

        Every turn is tokenised once (a multi-turn dialog would otherwise re-encode its context for
        each answer); the ids are exactly ``(prompt_ids(turns[:k]), answer_ids(turns[k].content))``.
        ``encoded`` may carry ``encode_texts`` of the turns' contents (up to the last answer), computed
        by the caller in one batched call.
        """
        wanted = set(answer_indices)
        for k in wanted:
            if turns[k].role != "assistant":
                raise ValueError(f"turn {k} is a {turns[k].role!r} turn, not an assistant answer")
        out: dict[int, tuple[list[int], list[int]]] = {}
        prefix = [self.bos_id] if self.bos_id is not None else []
        for k, turn in enumerate(turns[: max(wanted) + 1] if wanted else []):
            content = list(encoded[k]) if encoded is not None else self.encode_text(turn.content)
            if k in wanted:
                out[k] = (prefix + self._header_ids["assistant"], content + [self.eos_id])
            prefix = prefix + self._header_ids[turn.role] + content + [self.eos_id]
        return [out[k] for k in answer_indices]

    def decode_answer(self, ids: Sequence[int]) -> str:
        """Text of generated answer ids (cut at the first end-of-answer token)."""
        ids = list(ids)
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.tokenizer.decode([i for i in ids if i not in (self.pad_id, self.mask_id)],
                                     skip_special_tokens=True).strip()

    def fingerprint(self) -> str:
        """A stable hash of everything that decides the ids this template produces.

        It keys the tokenisation cache (``datasets.map``), so a second run with the same tokenizer
        and template reuses the cached ids, and any change to the vocabulary or headers re-tokenises.
        """
        if self._fingerprint is not None:
            return self._fingerprint
        tok = self.tokenizer
        backend = getattr(tok, "backend_tokenizer", None)
        if backend is not None:  # fast tokenizers: the full serialised pipeline (vocab, normaliser, ...)
            vocab = backend.to_str()
        else:
            vocab = json.dumps(sorted(tok.get_vocab().items()), ensure_ascii=False)
        h = hashlib.sha256()
        for part in (type(tok).__name__, vocab,
                     json.dumps(self.to_config(), sort_keys=True, ensure_ascii=False)):
            h.update(part.encode("utf-8"))
            h.update(b"\0")
        self._fingerprint = h.hexdigest()[:32]  # cached: serialising a large vocabulary is slow
        return self._fingerprint

    def to_config(self) -> dict:
        """What export writes to ``diffusion_config.json`` to rebuild this template."""
        return {
            "role_headers": self.role_headers,
            "add_bos": self.add_bos,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "mask_id": self.mask_id,
            "layout": "[BOS] (header content [EOS])* header(assistant) answer [EOS] [PAD]*",
        }


@dataclass
class ValidationPrompt:
    """A fixed prompt the sampling callback answers at every validation.

    Args:
        text: the user message.
        language: ISO code (samples and their metrics are grouped by it).
        system: optional system message before it.
    """

    text: str
    language: str = "en"
    system: Optional[str] = None

    def conversation(self) -> Conversation:
        """The prompt as a conversation (what ``MaskedDiffusionLM.prompt_ids`` takes)."""
        turns = ([Turn("system", self.system)] if self.system else []) + [Turn("user", self.text)]
        return Conversation(turns, source="validation_prompts", language=self.language)


DEFAULT_VALIDATION_PROMPTS = [
    ValidationPrompt("Hello, how are you?", "en"),
    ValidationPrompt("What is your favorite book?", "en"),
    ValidationPrompt("Tell me about computers.", "en"),
    ValidationPrompt("Привет! Как дела?", "ru"),
    ValidationPrompt("Что ты любишь есть?", "ru"),
    ValidationPrompt("Расскажи мне о деньгах.", "ru"),
]
