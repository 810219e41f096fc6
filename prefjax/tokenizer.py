"""Tokenizers: a built-in byte-level tokenizer and Hugging Face ``tokenizer.json`` folders.

A shared lower module, beside ``prefjax.sharding``: ``prefjax.data`` (the validator's and the
benchmark's tokenizers) and ``prefjax.models`` (its public tokenizer names, the ``tiny`` preset's
vocabulary) both need it and do not import each other. It imports nothing from prefjax.

Both classes share one small interface, which is all the data pipeline uses:

* ``vocab_size``, ``pad_id``, ``bos_id``, ``eos_id``;
* ``encode(text, *, add_special_tokens=False) -> list[int]`` -- special-token strings that appear in
  ``text`` (e.g. ``"<|assistant|>"`` or ``"<|eot_id|>"`` put there by a chat template) are encoded
  as their single ids; ``add_special_tokens=True`` additionally adds what the tokenizer's
  post-processor adds (a leading BOS for Llama-style tokenizers; for :class:`ByteTokenizer`, BOS);
* ``decode(ids, *, skip_special_tokens=False) -> str``;
* ``apply_chat_template(messages, *, add_generation_prompt=False) -> str`` -- ``messages`` is a list
  of ``{"role": ..., "content": ...}`` dicts; the rendered string is then passed to ``encode``.

Chat templates of Hugging Face folders are Jinja templates (``tokenizer_config.json`` field
``chat_template`` or a ``chat_template.jinja`` file); they are rendered with ``jinja2`` in a sandbox
the way ``transformers`` renders them, without importing ``transformers``.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Sequence

import jinja2
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

# The byte tokenizer's special tokens, in id order after the 256 byte ids. Eight in all so the
# vocabulary (264) is a multiple of 8 and shards evenly over up to 8 devices.
BYTE_SPECIAL_TOKENS = (
    "<pad>",
    "<bos>",
    "<eos>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
    "<unk>",
)

# The byte tokenizer's chat template (also valid Jinja, so it can be written to a
# tokenizer_config.json): one block per message, "<|role|>content<|end|>", and the assistant
# header when a generation prompt is asked for.
BYTE_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


class ByteTokenizer:
    """UTF-8 byte-level tokenizer: ids 0-255 are bytes, 256-263 special tokens.

    The vocabulary is fixed (no files), so the ``tiny`` preset and the built-in synthetic tasks can
    use it anywhere. ``pad_id`` = 256, ``bos_id`` = 257, ``eos_id`` = 258; roles are
    ``<|system|>``, ``<|user|>``, ``<|assistant|>`` and a message ends with ``<|end|>``.

    Example:
      >>> tok = prefjax.tokenizer.ByteTokenizer()
      >>> tok.encode("hi")
      [104, 105]
      >>> tok.decode(tok.encode("héllo", add_special_tokens=True) + [tok.eos_id])
      '<bos>héllo<eos>'
      >>> tok.apply_chat_template([{"role": "user", "content": "2+2?"}], add_generation_prompt=True)
      '<|user|>2+2?<|end|><|assistant|>'
    """

    vocab_size = 256 + len(BYTE_SPECIAL_TOKENS)
    pad_id = 256
    bos_id = 257
    eos_id = 258
    chat_template = BYTE_CHAT_TEMPLATE

    def __init__(self):
        self._special = {tok: 256 + i for i, tok in enumerate(BYTE_SPECIAL_TOKENS)}
        # Longest first so that no special token is matched by a prefix of another.
        self._special_sorted = sorted(self._special, key=len, reverse=True)

    def token_to_id(self, token: str) -> int | None:
        """The id of a special token string (``None`` if it is not one)."""
        return self._special.get(token)

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; special-token strings become their ids."""
        if not isinstance(text, str):
            raise TypeError(f"ByteTokenizer.encode expects a str, got {type(text).__name__}")
        ids = [self.bos_id] if add_special_tokens else []
        start = 0
        i = 0
        while i < len(text):
            if text[i] == "<":
                match = next((s for s in self._special_sorted if text.startswith(s, i)), None)
                if match is not None:
                    ids.extend(text[start:i].encode("utf-8"))
                    ids.append(self._special[match])
                    i += len(match)
                    start = i
                    continue
            i += 1
        ids.extend(text[start:].encode("utf-8"))
        return ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (invalid UTF-8 is replaced by U+FFFD)."""
        out: list[str] = []
        buf = bytearray()
        for raw in ids:
            i = int(raw)
            if not 0 <= i < self.vocab_size:
                raise ValueError(
                    f"token id {i} is outside the byte vocabulary [0, {self.vocab_size})"
                )
            if i < 256:
                buf.append(i)
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            if not skip_special_tokens:
                out.append(BYTE_SPECIAL_TOKENS[i - 256])
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def apply_chat_template(self, messages, *, add_generation_prompt: bool = False) -> str:
        """Render a conversation with the built-in template (see ``BYTE_CHAT_TEMPLATE``)."""
        parts = []
        for n, message in enumerate(messages):
            role, content = _check_message(message, n)
            if role not in ("system", "user", "assistant"):
                raise ValueError(
                    f"message {n}: role {role!r} is not one of 'system', 'user', 'assistant'"
                )
            parts.append(f"<|{role}|>{content}<|end|>")
        if add_generation_prompt:
            parts.append("<|assistant|>")
        return "".join(parts)


def _check_message(message, n: int) -> tuple[str, str]:
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
        raise ValueError(f"message {n} must be a dict with 'role' and 'content', got {message!r}")
    if not isinstance(message["content"], str):
        raise ValueError(f"message {n}: 'content' must be a str, got {message['content']!r}")
    return message["role"], message["content"]


def _token_content(value) -> str | None:
    """A special token entry of tokenizer_config.json: a string or an AddedToken dict."""
    if value is None:
        return None
    if isinstance(value, dict):
        return value.get("content")
    return str(value)


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` (loaded with the ``tokenizers`` library) plus its chat
    template and special tokens from ``tokenizer_config.json``. Build it with
    :func:`load_tokenizer`.

    Attributes:
      tokenizer: the underlying ``tokenizers.Tokenizer``.
      chat_template: the Jinja chat template string, or ``None``.
      bos_token, eos_token, pad_token: special token strings (``None`` when absent).
    """

    def __init__(
        self,
        tokenizer,
        *,
        chat_template: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        source: str = "<memory>",
    ):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_id = self._id(bos_token, "bos_token")
        self.eos_id = self._id(eos_token, "eos_token")
        if pad_token is None:
            # Many causal-LM tokenizers define no pad token; batches still need a pad id, and
            # padding is always masked, so reuse EOS as Hugging Face recipes do.
            pad_token = eos_token
        self.pad_token = pad_token
        self.pad_id = self._id(pad_token, "pad_token")
        self._compiled_template = None

    def _id(self, token: str | None, field: str) -> int | None:
        if token is None:
            return None
        idx = self.tokenizer.token_to_id(token)
        if idx is None:
            raise ValueError(f"{self.source}: {field} {token!r} is not in the tokenizer vocabulary")
        return idx

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        """The id of a token string (``None`` if unknown)."""
        return self.tokenizer.token_to_id(token)

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text`` (special-token strings in ``text`` become their ids)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Text of ``ids``."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages, *, add_generation_prompt: bool = False, **kwargs
    ) -> str:
        """Render ``messages`` with the folder's Jinja chat template.

        Extra keyword arguments are passed to the template (e.g. ``tools`` or
        ``enable_thinking``), as ``transformers`` does.
        """
        if self.chat_template is None:
            raise ValueError(
                f"{self.source}: no chat template (neither 'chat_template' in "
                "tokenizer_config.json nor chat_template.jinja)"
            )
        for n, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message:
                raise ValueError(f"message {n} must be a dict with a 'role', got {message!r}")
        if self._compiled_template is None:
            self._compiled_template = _compile_jinja(self.chat_template)
        return self._compiled_template.render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            pad_token=self.pad_token or "",
            **kwargs,
        )


def _compile_jinja(template: str):
    """Compile a chat template the way ``transformers`` does (sandboxed, trimmed blocks)."""

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(fmt):
        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(template)


def load_tokenizer(path: str) -> HFTokenizer:
    """Load the tokenizer of a local Hugging Face model folder (never touches the network).

    Reads ``tokenizer.json`` with the ``tokenizers`` library; special tokens and the chat template
    come from ``tokenizer_config.json`` (``bos_token``, ``eos_token``, ``pad_token``,
    ``chat_template`` -- a string, or a list of named templates of which ``"default"`` is used) or
    from a ``chat_template.jinja`` file beside it. When the folder's tokenizer_config.json lacks BOS
    or EOS, the ``bos_token_id`` / ``eos_token_id`` of ``config.json`` are used.

    Args:
      path: the folder.

    Returns:
      An :class:`HFTokenizer`.
    """
    tok_file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tok_file):
        raise FileNotFoundError(
            f"no tokenizer.json in {path!r} (only fast tokenizers are supported)"
        )
    tokenizer = tokenizers.Tokenizer.from_file(tok_file)
    cfg = {}
    cfg_file = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(cfg_file):
        with open(cfg_file) as f:
            cfg = json.load(f)
    template = cfg.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template}
        if "default" not in named:
            raise ValueError(
                f"{cfg_file}: chat_template is a list without a 'default' entry: {sorted(named)}"
            )
        template = named["default"]
    jinja_file = os.path.join(path, "chat_template.jinja")
    if template is None and os.path.isfile(jinja_file):
        with open(jinja_file) as f:
            template = f.read()
    bos = _token_content(cfg.get("bos_token"))
    eos = _token_content(cfg.get("eos_token"))
    pad = _token_content(cfg.get("pad_token"))
    model_cfg_file = os.path.join(path, "config.json")
    if (bos is None or eos is None) and os.path.isfile(model_cfg_file):
        with open(model_cfg_file) as f:
            model_cfg = json.load(f)

        def from_id(key):
            value = model_cfg.get(key)
            if isinstance(value, list):
                value = value[0] if value else None
            return None if value is None else tokenizer.id_to_token(int(value))

        bos = bos if bos is not None else from_id("bos_token_id")
        eos = eos if eos is not None else from_id("eos_token_id")
    return HFTokenizer(
        tokenizer,
        chat_template=template,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        source=path,
    )
