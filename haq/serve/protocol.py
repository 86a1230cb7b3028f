"""The OpenAI-compatible request bodies, validated where they are declared: bounds in `Field`,
unknown fields rejected (a typo is an error, not a silent default), one validator per rule."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(default=None, ge=1, description="tokens to generate (default 16, chat: 256)")
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    seed: int | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    stop: str | list[str] | None = None
    stream: bool = Field(default=False, strict=True)  # "yes" is not a boolean
    stream_options: dict | None = None
    n: int = Field(default=1, ge=1, le=1, description="one choice per request")
    ignore_eos: bool = Field(default=False, strict=True, description="vLLM's extension: generate max_tokens tokens")
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    @property
    def stops(self) -> list[str]:
        return list(self.stop or [])


class CompletionRequest(_Request):
    prompt: str | list[int] = Field(min_length=1, description="text, or token ids as OpenAI allows")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
