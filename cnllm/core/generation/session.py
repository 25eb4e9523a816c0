"""A multi-turn conversation kept within the context window (what ``cnllm chat`` drives)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cnllm.core.errors import UsageError
from cnllm.core.generation.base import ContextOverflow, GenerationStream, LoadedModel, SamplingParams
from cnllm.core.templates import Message, PromptFormat

SESSION_FORMAT = "cnllm-chat-session/1"


@dataclass
class ChatSession:
    """History, system prompt and sampling parameters; the oldest turns are dropped when the prompt would not fit."""

    generator: LoadedModel
    prompt_format: PromptFormat
    params: SamplingParams
    system: str | None = None
    history: list[Message] = field(default_factory=list)
    dropped_turns: int = 0

    def answer_room(self) -> int:
        """Tokens kept free for the answer when trimming: ``max_tokens``, at most half the window."""
        half = self.generator.context_length // 2
        return min(self.params.max_tokens or half, half)

    def prompt_ids(self, user_text: str) -> list[int]:
        """The prompt for the next answer, dropping whole oldest turns (never the system prompt) until it fits."""
        turns = list(self.history)
        limit = self.generator.context_length - self.answer_room()
        while True:
            messages = turns + [Message("user", user_text)]
            ids = self.generator.encode_prompt(self.prompt_format.render(messages, self.system))
            if len(ids) <= limit or not turns:
                break
            turns = turns[2:]
        if len(ids) >= self.generator.context_length:
            raise ContextOverflow(len(ids), self.generator.context_length)
        self.dropped_turns += (len(self.history) - len(turns)) // 2
        self.history = turns
        return ids

    def ask(self, user_text: str) -> GenerationStream:
        """Start the answer; call :meth:`record` with the stream once it ends (completed or interrupted)."""
        params = SamplingParams(**{**asdict(self.params), "stop": tuple(self.params.stop) + self.prompt_format.stop})
        return GenerationStream(self.generator, self.prompt_ids(user_text), params, strip_leading_space=not self.prompt_format.is_plain)

    def record(self, user_text: str, answer: str) -> None:
        self.history += [Message("user", user_text), Message("assistant", answer)]

    def clear(self) -> None:
        self.history = []

    def save(self, path: Path) -> None:
        from cnllm.core.atomic import atomic_file

        document = {
            "format": SESSION_FORMAT,
            "system": self.system,
            "messages": [{"role": m.role, "content": m.content} for m in self.history],
            "params": asdict(self.params),
        }
        with atomic_file(path, force=True, mode="w") as handle:
            handle.write(json.dumps(document, ensure_ascii=False, indent=2) + "\n")

    def load(self, path: Path) -> None:
        try:
            document = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UsageError(f"{path} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UsageError(f"{path} is not a saved chat (invalid JSON: {exc})") from None
        if not isinstance(document, dict) or document.get("format") != SESSION_FORMAT:
            raise UsageError(f"{path} is not a saved chat (expected format {SESSION_FORMAT})")
        messages = document.get("messages", [])
        if not all(isinstance(m, dict) and m.get("role") in ("user", "assistant") and isinstance(m.get("content"), str) for m in messages):
            raise UsageError(f"{path}: messages must be user/assistant objects with string content")
        self.history = [Message(m["role"], m["content"]) for m in messages]
        self.system = document.get("system")
        params = {k: v for k, v in (document.get("params") or {}).items() if k in SamplingParams.__dataclass_fields__}
        if "stop" in params:
            params["stop"] = tuple(params["stop"])
        self.params = SamplingParams(**{**asdict(self.params), **params})
