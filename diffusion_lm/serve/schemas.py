"""Request bodies of the HTTP API (pydantic): the OpenAI chat-completions subset we serve, the
``diffusion`` extension field, and the infill endpoint.

Unknown fields are errors (``extra="forbid"``), so a typo or an OpenAI feature we do not implement
is reported by name instead of being silently ignored. Fields OpenAI clients commonly send with
neutral values (``user``, ``stream_options``, zero penalties, ``logprobs: false``) are accepted.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["ChatCompletionRequest", "ChatMessage", "DiffusionOptions", "InfillRequest", "StreamOptions",
           "TextPart"]

# Seeds are mixed as 64-bit integers by the sampler; anything in int64/uint64 range is accepted.
_SEED = dict(ge=-(2**63), lt=2**64)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DiffusionOptions(_Strict):
    """The diffusion extension of a request (``"diffusion": {...}``); every field is optional and
    goes on top of the server's default sampler.

    Attributes:
        preset: start from this sampler preset (``quality``, ``fast``, ``greedy``) instead of the
            server's default sampler.
        steps: forward passes for the whole answer (schedule selector).
        threshold: confidence threshold selector (commit every slot at least this sure, one at least).
        block_size: semi-autoregressive block size in answer slots.
        top_k: sample among the k most likely tokens (needs temperature > 0).
    """

    preset: Optional[str] = None
    steps: Optional[int] = Field(None, ge=1)
    threshold: Optional[float] = Field(None, gt=0)
    block_size: Optional[int] = Field(None, ge=1)
    top_k: Optional[int] = Field(None, ge=1)


class TextPart(_Strict):
    """A text content part (``{"type": "text", "text": ...}``); other part types are not served."""

    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    """One message of ``messages``. ``developer`` is OpenAI's newer name for ``system``."""

    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: Optional[str] = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    """``stream_options``: ``include_usage`` adds a last chunk with the token counts."""

    include_usage: bool = False


class _Sampling(_Strict):
    model: Optional[str] = None
    temperature: Optional[float] = Field(None, ge=0)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    seed: Optional[int] = Field(None, **_SEED)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    diffusion: Optional[DiffusionOptions] = None


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``. ``max_tokens`` (or ``max_completion_tokens``) is the answer's
    canvas: the number of [MASK] slots unmasked; the answer ends earlier when the model commits EOS."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    n: int = Field(1, ge=1, le=1)
    stop: Optional[Union[str, list[str]]] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool = False

    @field_validator("stop")
    @classmethod
    def _no_stop(cls, value):
        if value:  # stop strings need left-to-right decoding; a diffusion answer has no "so far"
            raise ValueError("stop sequences are not supported by a diffusion sampler (the answer ends at "
                             "its EOS)")
        return value

    @field_validator("presence_penalty", "frequency_penalty", "logprobs")
    @classmethod
    def _off_only(cls, value, info):
        # the repetition guard is the sampler's tool against loops (diffusion.preset / server flags)
        if value:
            raise ValueError(f"{info.field_name} is not supported; only its neutral value (0 / false) is "
                             "accepted")
        return value


class InfillRequest(_Sampling):
    """``POST /v1/infill``: fill the ``[[MASK]]`` / ``[[MASK:n]]`` holes of ``text``; every character
    outside the holes is kept. ``prompt`` treats the text as the assistant's answer to that message."""

    text: str
    prompt: Optional[str] = None
    default_slots: int = Field(8, ge=1)
