"""A checkpoint's tokenizer: `tokenizer.json` through the `tokenizers` library, plus the chat
template (from `tokenizer_config.json` or `chat_template.jinja`) rendered as transformers renders
it, and the incremental detokenizer every response's text comes from."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from .config import ModelLoadError


class PromptTooLong(ValueError):
    def __init__(self, tokens: int):
        super().__init__(f"the prompt has {tokens} tokens")
        self.tokens = tokens


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        d = Path(model_dir)
        path = d / "tokenizer.json"
        if not path.is_file():
            raise ModelLoadError(f"{d}: no tokenizer.json")
        try:
            self.tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises plain Exception on bad files
            raise ModelLoadError(f"{path}: cannot load tokenizer ({e})") from None
        cfg_path = d / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        template = d / "chat_template.jinja"
        self.chat_template: str | None = template.read_text() if template.is_file() else cfg.get("chat_template")
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))
        names = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
        self.special_tokens = {n: _token_text(cfg[n]) for n in names if _token_text(cfg.get(n)) is not None}  # as transformers passes them
        self.vocab_size = self.tok.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True, max_tokens: int | None = None) -> list[int]:
        """`encode_batch`, not `encode`: only the batch call releases the GIL while it works, so a
        long prompt tokenized on a thread does not stall the others (the server's event loop:
        3 MB took 3 s with the GIL held). Longer than `max_tokens`: PromptTooLong, before the ids
        become a Python list (itself ~0.1 s per 600k tokens, GIL held)."""
        enc = self.tok.encode_batch([text], add_special_tokens=add_special_tokens)[0]
        if max_tokens is not None and len(enc) > max_tokens:
            raise PromptTooLong(len(enc))
        return enc.ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """Rendered by transformers' own renderer where transformers is installed (the output
        vLLM and transformers users get), else by a Jinja2 set-up with the same extras."""
        if not self.chat_template:
            raise ValueError("this model's tokenizer has no chat template")
        kwargs = {**self.special_tokens, **kwargs}
        try:
            from transformers.utils.chat_template_utils import render_jinja_template
        except ImportError:
            return _render(self.chat_template, messages=messages, add_generation_prompt=add_generation_prompt, **kwargs)
        rendered, _ = render_jinja_template([messages], chat_template=self.chat_template, add_generation_prompt=add_generation_prompt,
                                            **kwargs)
        return rendered[0]


def _render(template: str, **context) -> str:
    """transformers' Jinja2 environment, for when transformers is not installed: sandboxed,
    trim_blocks/lstrip_blocks, loop controls ({% break %}), `tojson` without ASCII escapes,
    `strftime_now`, `raise_exception`."""
    from datetime import datetime

    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])

    def raise_exception(msg: str):
        raise ValueError(msg)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(template).render(**context)


def _token_text(tok) -> str | None:
    return tok.get("content") if isinstance(tok, dict) else tok


class Detokenizer:
    """One request's output text, decoded as its tokens arrive (each token once, never the
    whole output again) with its stop strings found as they appear. `LLM.generate` and the
    server's responses both read their text from here."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str] | None = None, include_stop: bool = False):
        from tokenizers.decoders import DecodeStream

        self._tok = tokenizer.tok
        self._stream = DecodeStream(skip_special_tokens=True)
        self.stop = list(stop or [])
        self._hold = max((len(s) for s in self.stop), default=1) - 1  # text that could begin a stop string
        self._include_stop = include_stop
        self.text = ""
        self.consumed = 0  # tokens decoded so far
        self.stop_reason: str | None = None  # the stop string that ended the text

    def update(self, tokens: list[int], upto: int | None = None) -> bool:
        """Decode `tokens[consumed:upto]` (tokens is the whole output so far); True once a stop
        string has ended the text (the tokens after it are not consumed)."""
        upto = len(tokens) if upto is None else upto
        while self.consumed < upto and self.stop_reason is None:
            piece = self._stream.step(self._tok, tokens[self.consumed])
            self.consumed += 1
            if piece:  # None while a multi-byte character is incomplete
                start = max(0, len(self.text) - self._hold)
                self.text += piece
                if self.stop:
                    self._find_stop(start)
        return self.stop_reason is not None

    def _find_stop(self, start: int) -> None:
        hits = [(i, s) for s in self.stop if (i := self.text.find(s, start)) >= 0]
        if hits:
            i, s = min(hits)
            self.text = self.text[: i + len(s) if self._include_stop else i]
            self.stop_reason = s

    def releasable(self, final: bool) -> int:
        """How much of `text` a stream may send now: all once final or stopped, else all but what
        could still turn out to begin a stop string."""
        if final or self.stop_reason is not None:
            return len(self.text)
        return max(0, len(self.text) - self._hold)
