"""The OpenAI-compatible request bodies, validated where they are declared: bounds in `Field`,
unknown fields rejected (a typo is an error, not a silent default), types strict ("5" is not a
number, true is not 1), one validator per rule. What current OpenAI clients send is taken:
`max_completion_tokens`, null for a sampling field (its default), a message's content as a list of
text parts, and the `developer` role (the system prompt, as OpenAI's reasoning models name it)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from haq.runtime.sampling import MAX_LOGPROBS

MAX_N = 64  # choices per prompt
MAX_STOPS = 16  # OpenAI takes 4; lm-eval sends a task's stop strings plus the EOS text, vLLM any number
NULL_IS_DEFAULT = ("temperature", "top_p", "top_k", "presence_penalty", "frequency_penalty", "repetition_penalty")


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    max_tokens: int | None = Field(default=None, ge=1, description="tokens to generate (default 16, chat: 256)")
    max_completion_tokens: int | None = Field(default=None, ge=1, description="OpenAI's newer name of max_tokens")
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    seed: int | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    n: int = Field(default=1, ge=1, le=MAX_N, description="choices per prompt (choice i samples with seed + i)")
    ignore_eos: bool = Field(default=False, description="vLLM's extension: generate max_tokens tokens")
    user: str | None = None

    @field_validator(*NULL_IS_DEFAULT, mode="before")
    @classmethod
    def _null_is_the_default(cls, value, info):
        return cls.model_fields[info.field_name].default if value is None else value

    @model_validator(mode="after")
    def _one_max_tokens(self):
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise ValueError("max_tokens and max_completion_tokens differ: send one")
            self.max_tokens = self.max_completion_tokens
        return self

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOPS or any(not s for s in stops):
            raise ValueError(f"stop takes up to {MAX_STOPS} non-empty strings")
        return stops

    @property
    def stops(self) -> list[str]:
        return list(self.stop or [])


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str] | list[list[int]] = Field(
        min_length=1, description="text or token ids, or a batch of either (one choice each), as OpenAI allows")
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS,
                                 description="each token's log-probability and this many most likely ones")
    echo: bool | None = Field(default=None, description="the prompt before the completion (with logprobs: its "
                                                        "tokens' log-probabilities, lm-eval's loglikelihood)")

    @field_validator("prompt")
    @classmethod
    def _no_empty_prompt(cls, value):
        if isinstance(value, list) and any(len(item) == 0 for item in value if isinstance(item, (str, list))):
            raise ValueError("every prompt of a batch needs at least one character or token")
        return value

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompt as a batch: one text or token list per choice."""
        single = isinstance(self.prompt, str) or isinstance(self.prompt[0], int)
        return [self.prompt] if single else list(self.prompt)

    @property
    def top_logprobs_asked(self) -> int | None:
        return self.logprobs

    @property
    def prompt_logprobs_asked(self) -> bool:
        """echo with logprobs: the prompt tokens' log-probabilities lead the choice's."""
        return bool(self.echo) and self.logprobs is not None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict]
    name: str | None = None

    @field_validator("role")
    @classmethod
    def _developer_is_system(cls, value: str) -> str:
        return "system" if value == "developer" else value

    @field_validator("content")
    @classmethod
    def _text_parts(cls, value):
        if isinstance(value, str):
            return value
        if any(part.get("type") != "text" or not isinstance(part.get("text"), str) for part in value):
            raise ValueError("content parts must be text ({\"type\": \"text\", \"text\": ...}): this model reads text only")
        return "".join(part["text"] for part in value)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = Field(default=None, description="each token's log-probability")
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS, description="and this many most likely ones")

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def top_logprobs_asked(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def prompt_logprobs_asked(self) -> bool:
        return False  # chat has no echo
