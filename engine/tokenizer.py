"""Tokenizer, chat template and end-of-sequence ids, all taken from the checkpoint."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from tokenizers.decoders import DecodeStream

from .errors import InvalidRequest, ModelLoadError
from .types import GenerationRequest


class Tokenizer:
    def __init__(self, checkpoint: Path) -> None:
        from transformers import AutoTokenizer

        try:
            self._tok = AutoTokenizer.from_pretrained(checkpoint)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{checkpoint}: cannot load the tokenizer: {exc}") from exc
        self.backend = self._tok.backend_tokenizer
        self.eos_ids = frozenset(self._eos_ids(checkpoint))
        self.has_chat_template = bool(getattr(self._tok, "chat_template", None))

    def _eos_ids(self, checkpoint: Path) -> set[int]:
        ids: set[int] = set()
        for name in ("generation_config.json", "config.json"):
            path = checkpoint / name
            if path.is_file():
                eos = json.loads(path.read_text()).get("eos_token_id")
                if isinstance(eos, int):
                    ids.add(eos)
                elif isinstance(eos, list):
                    ids.update(int(e) for e in eos)
        if self._tok.eos_token_id is not None:
            ids.add(int(self._tok.eos_token_id))
        return ids

    def encode(self, request: GenerationRequest) -> list[int]:
        if request.prompt_token_ids is not None:
            return [int(t) for t in request.prompt_token_ids]
        if request.messages is not None:
            if not self.has_chat_template:
                raise InvalidRequest("this model has no chat template; send a prompt instead", param="messages")
            conversation = [{"role": m.role, "content": m.content} for m in request.messages]
            ids = self._tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
            if hasattr(ids, "keys"):  # BatchEncoding
                ids = ids["input_ids"]
            return list(ids)
        if request.prompt is not None:
            return self.backend.encode(request.prompt, add_special_tokens=False).ids
        raise InvalidRequest("a request needs messages, a prompt or prompt token ids")

    def render(self, messages: Sequence[dict]) -> str:
        return self._tok.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=True)

    def decode_stream(self, prompt_ids: Sequence[int]) -> DecodeStream:
        """Incremental, UTF-8 safe detokenizer primed with the prompt's tail (for spacing)."""
        return DecodeStream(ids=list(prompt_ids[-4:]), skip_special_tokens=True)
