"""Tokenizer: text <-> token ids, chat templates, and incremental detokenization for streaming.

It reads a Hugging Face tokenizer directory (tokenizer.json + tokenizer_config.json). A GGUF file
carries its vocabulary in metadata instead; the first load converts it with transformers (a few
seconds) and writes tokenizer.json + tokenizer_config.json into the GGUF's cache directory (see
``ringserve.engine.weights.gguf_cache_dir``), so later loads read that directory like any other.
"""

from __future__ import annotations

import functools
import json
import re
from datetime import datetime
from pathlib import Path

from ringserve.engine.weights import atomic_write, gguf_cache_dir, gguf_value, open_gguf, resolve_model_path
from ringserve.errors import FailedPrecondition, InvalidArgument

_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _token_text(value) -> str | None:
    """tokenizer_config.json spells a special token as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _ids(value) -> list[int]:
    """config.json allows an eos id to be an int or a list of ints."""
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FailedPrecondition(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise FailedPrecondition(f"{path} does not hold a JSON object")
    return data


class Tokenizer:
    """A checkpoint's tokenizer: encode/decode, chat template, special token ids."""

    def __init__(self, tokenizer, config: dict, extra_eos_ids: list[int] | None = None) -> None:
        """Wrap a ``tokenizers.Tokenizer`` and its tokenizer_config dict (use ``from_checkpoint``)."""
        self._tok = tokenizer
        self._config = config
        self._template = None  # compiled lazily: most callers never use it
        self._extra_eos_ids = list(extra_eos_ids or [])

    @classmethod
    def from_checkpoint(cls, path: str | Path | None) -> Tokenizer:
        """The tokenizer of a checkpoint: a Hugging Face directory (or a .safetensors file in one),
        a .gguf file, or None for the default model."""
        p = resolve_model_path(path)
        if p.is_file() and p.suffix.lower() == ".gguf":
            directory = gguf_cache_dir(p)
            if (
                not (directory / "tokenizer.json").is_file()
                or not (directory / "tokenizer_config.json").is_file()
            ):
                _convert_gguf_tokenizer(p, directory)
        elif p.is_file() and p.suffix.lower() == ".safetensors":
            directory = p.parent
        elif p.is_dir():
            directory = p
        else:
            raise FailedPrecondition(f"{p} is neither a directory nor a .gguf file, so it has no tokenizer")
        return cls._from_dir(directory)

    @classmethod
    def _from_dir(cls, directory: Path) -> Tokenizer:
        from tokenizers import Tokenizer as FastTokenizer

        tok_path = directory / "tokenizer.json"
        if not tok_path.is_file():
            raise FailedPrecondition(
                f"{directory} has no tokenizer.json; ringserve needs the Hugging Face 'fast' tokenizer file "
                "(save one with transformers: AutoTokenizer.from_pretrained(dir).save_pretrained(dir))"
            )
        try:
            tokenizer = FastTokenizer.from_file(str(tok_path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise FailedPrecondition(f"cannot read {tok_path}: {e}") from e
        config_path = directory / "tokenizer_config.json"
        config = _read_json(config_path) if config_path.is_file() else {}
        if not config.get("chat_template"):
            # Newer transformers saves the template beside the config rather than inside it.
            jinja_path, json_path = directory / "chat_template.jinja", directory / "chat_template.json"
            if jinja_path.is_file():
                config["chat_template"] = jinja_path.read_text(encoding="utf-8")
            elif json_path.is_file():
                config["chat_template"] = _read_json(json_path).get("chat_template")
        # Generation stops on the model's eos ids too (Llama 3.1 lists several there).
        extra = []
        for name in ("config.json", "generation_config.json"):
            if (directory / name).is_file():
                extra += _ids(_read_json(directory / name).get("eos_token_id"))
        return cls(tokenizer, config, extra)

    # -- special tokens ---------------------------------------------------------------------------

    def _special_id(self, key: str) -> int | None:
        text = _token_text(self._config.get(key))
        return None if text is None else self._tok.token_to_id(text)

    @property
    def bos_token_id(self) -> int | None:
        """The beginning-of-sequence id, or None if the tokenizer has none."""
        return self._special_id("bos_token")

    @property
    def vocab_size(self) -> int:
        """Tokens the tokenizer knows, added tokens included (the model's embedding may be larger)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @functools.cached_property
    def eos_token_ids(self) -> list[int]:
        """Ids that end generation: the eos token, the model config's eos ids, and the chat
        template's end-of-turn token (e.g. ``<|im_end|>``, ``<|eot_id|>``) when it differs.
        Computed once: finding the end-of-turn token renders the template."""
        ids = []
        for i in [self._special_id("eos_token"), *self._extra_eos_ids, self._end_of_turn_id()]:
            if i is not None and i not in ids:
                ids.append(i)
        return ids

    def _end_of_turn_id(self) -> int | None:
        """The special token the template writes right after an assistant message, if any."""
        if not self._config.get("chat_template"):
            return None
        marker = "RINGSERVE_END_OF_TURN_PROBE"
        try:
            text = self.apply_chat_template(
                [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
                add_generation_prompt=False,
            )
        except Exception:  # a template that rejects this conversation just has no detectable marker
            return None
        _, found, after = text.partition(marker)
        ids = self.encode(after, add_special_tokens=False) if found else []
        if not ids:
            return None
        added = self._tok.get_added_tokens_decoder().get(ids[0])
        return ids[0] if added is not None and added.special else None

    # -- text <-> ids -----------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for ``text``. With ``add_special_tokens``, BOS/EOS are added as the checkpoint
        says (SmolLM2 adds none). Encode a rendered chat template with ``add_special_tokens=False``:
        templates write their own BOS."""
        if not isinstance(text, str):
            raise InvalidArgument(f"text to encode must be a str, got {type(text).__name__}")
        add_bos, add_eos = self._config.get("add_bos_token"), self._config.get("add_eos_token")
        if not add_special_tokens or (add_bos is None and add_eos is None):
            # No explicit flags: tokenizer.json's post-processor knows what to add.
            return self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        # Explicit flags in tokenizer_config.json win over the post-processor, as in transformers.
        ids = self._tok.encode(text, add_special_tokens=False).ids
        bos, eos = self.bos_token_id, self._special_id("eos_token")
        if add_bos and bos is not None:
            ids = [bos, *ids]
        if add_eos and eos is not None:
            ids = [*ids, eos]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """The text of ``ids`` (special tokens included unless ``skip_special_tokens``)."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # -- chat -------------------------------------------------------------------------------------

    @property
    def has_chat_template(self) -> bool:
        """Whether the checkpoint ships a chat template."""
        return bool(self._config.get("chat_template"))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render ``messages`` ([{"role": ..., "content": ...}, ...]) with the checkpoint's Jinja chat
        template, as transformers does; ``add_generation_prompt`` opens the assistant's turn.

        Roles must be the template's (``chat_roles``) and content must not spell the special tokens
        the template writes (``<|im_end|>`` ...): either would let a caller forge turns, say a system
        prompt of its own (template injection). Both are InvalidArgument."""
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages
        ):
            raise InvalidArgument('messages must be a list of {"role": str, "content": str} dicts')
        for i, m in enumerate(messages):
            self._check_message(i, m)
        return self._render(messages, add_generation_prompt)

    @functools.cached_property
    def chat_roles(self) -> tuple[str, ...]:
        """The roles the template takes: system, user, assistant, and tool where it has tool turns."""
        source = self._config.get("chat_template") or ""
        if isinstance(source, list):  # named templates
            source = " ".join(str(t.get("template", "")) for t in source if isinstance(t, dict))
        return ("system", "user", "assistant", *(("tool",) if re.search(r"""['"]tool['"]""", source) else ()))

    @functools.cached_property
    def _template_tokens(self) -> tuple[str, ...]:
        """The special tokens the template writes around turns, as text (found by rendering one)."""
        probe = [{"role": r, "content": "x"} for r in ("system", "user", "assistant")]
        try:
            ids = self.encode(self._render(probe, add_generation_prompt=True), add_special_tokens=False)
        except InvalidArgument:  # a template that refuses this conversation: fall back to all special tokens
            ids = list(self._tok.get_added_tokens_decoder())
        added = self._tok.get_added_tokens_decoder()
        return tuple(sorted({added[i].content for i in ids if i in added and added[i].special}))

    def _check_message(self, i: int, message: dict) -> None:
        role, content = message["role"], message.get("content", "")
        if role not in self.chat_roles:
            raise InvalidArgument(
                f"message {i}: role {role[:40]!r} is not one of this model's chat roles ({', '.join(self.chat_roles)})"
            )
        if not isinstance(content, str):
            raise InvalidArgument(f"message {i}: content must be a str, got {type(content).__name__}")
        for token in self._template_tokens:
            if token in content:
                raise InvalidArgument(
                    f"message {i}: content contains {token!r}, a special token of the chat template; "
                    "remove it (as text it would start or end a turn)"
                )

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        import jinja2

        template = self._compiled_template()
        context = {key: _token_text(self._config.get(key)) or "" for key in _SPECIAL_TOKEN_KEYS}
        try:
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **context)
        except jinja2.TemplateError as e:
            # Templates call raise_exception on conversations they do not accept (e.g. roles that
            # do not alternate): that is the caller's input to fix.
            raise InvalidArgument(f"the chat template rejected the messages: {e}") from e

    def _compiled_template(self):
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        if self._template is not None:
            return self._template
        source = self._config.get("chat_template")
        if isinstance(source, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        if not source:
            raise FailedPrecondition(
                "this checkpoint has no chat template; send a plain prompt instead of chat messages"
            )

        def raise_exception(message: str):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(
                x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
            )

        # The same environment transformers uses, so templates render identically.
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as e:
            raise FailedPrecondition(f"the checkpoint's chat template does not compile: {e}") from e
        return self._template


def _convert_gguf_tokenizer(gguf_path: Path, directory: Path) -> None:
    """Write tokenizer.json + tokenizer_config.json for a GGUF's embedded vocabulary into ``directory``.

    transformers knows how to rebuild the fast tokenizer from llama.cpp metadata (vocabulary,
    merges, pre-tokenizer type, special tokens), so we use it once and keep the result.
    """
    from transformers import AutoTokenizer

    reader = open_gguf(gguf_path)  # fails cleanly on corrupt files before transformers sees them
    try:
        hf = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except Exception as e:
        raise FailedPrecondition(f"cannot build a tokenizer from the vocabulary in {gguf_path}: {e}") from e
    config: dict = {key: getattr(hf, key, None) for key in _SPECIAL_TOKEN_KEYS}
    # llama.cpp's flags decide whether plain prompts get BOS/EOS; absent flags leave it to tokenizer.json.
    for flag in ("add_bos_token", "add_eos_token"):
        value = gguf_value(reader, f"tokenizer.ggml.{flag}", None)
        if value is not None:
            config[flag] = bool(value)
    config["chat_template"] = gguf_value(reader, "tokenizer.chat_template", None)
    text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    # tokenizer.json goes first: a load checks for both files, and each is replaced atomically.
    atomic_write(directory / "tokenizer.json", lambda p: hf.backend_tokenizer.save(str(p)))
    atomic_write(directory / "tokenizer_config.json", lambda p: p.write_text(text, encoding="utf-8"))


class StreamDecoder:
    """Incremental detokenization for streaming: ``push`` each generated id, emit what it returns.

    Decoding a token on its own is wrong in general: a byte-level token may hold half of a UTF-8
    character, and sentencepiece decoders drop a leading space at the start of a text. So this
    decodes a short window of recent ids with and without the new one and emits the difference,
    holding text back while it ends in an incomplete character (decoded as U+FFFD).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # window start: ids before it are fully emitted and no longer decoded
        self._read = 0  # ids before this have been emitted

    def _pending(self) -> tuple[str, str]:
        """(text of the emitted part of the window, text of the whole window)."""
        done = self._tokenizer.decode(self._ids[self._prefix : self._read], skip_special_tokens=self._skip)
        full = self._tokenizer.decode(self._ids[self._prefix :], skip_special_tokens=self._skip)
        return done, full

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text it completes ('' while a character is incomplete)."""
        self._ids.append(int(token_id))
        done, full = self._pending()
        if len(full) > len(done) and not full.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return full[len(done) :]
        return ""

    def flush(self) -> str:
        """The text still held back at the end of generation (may hold U+FFFD for invalid bytes)."""
        done, full = self._pending()
        self._prefix = self._read = len(self._ids)
        return full[len(done) :] if len(full) > len(done) else ""
