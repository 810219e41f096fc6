"""Tokenisation of prompts and responses with an explicit truncation policy.

Each example is split into prompt tokens and response tokens (tokenised separately so the
boundary, and hence the loss mask, is exact):

* prompt tokens: ``[bos] + encode(prompt)`` (``bos`` only if the tokenizer has one and
  ``add_bos``); a conversation prompt is rendered with the tokenizer's chat template and the
  generation prompt;
* response tokens: ``encode(response) + [eos]`` (``append_eos``); a conversation response is the
  part of the full rendered conversation that follows the rendered prompt.

Truncation (:class:`TruncationPolicy`), applied per example:

1. the prompt is cut to ``max_prompt_len`` tokens, keeping its END by default (the question is
   usually at the end of a long context);
2. each response is cut to ``max_len - len(prompt)`` tokens, keeping its START by default (a cut
   response loses its EOS, correctly: it did not end there).

If ``max_prompt_len`` is ``None`` the prompt is only limited by ``max_len``; an example whose
response would keep fewer than ``min_response_len`` tokens is reported as a :class:`DataError`
(``code="response_truncated"``) — raised, or dropped and listed with ``on_error="drop"``.

Step-level examples (kind ``step``, for process reward models): the response is the steps in
order, each encoded on its own and followed by the one-token ``step_separator`` (default
``"\\n"``), then EOS: ``encode(s_1) + [sep] + ... + encode(s_n) + [sep] + [eos]``. The step's label
sits at its separator token in ``step_labels`` (-1 at every other token), so a process reward
model reads its step scores where a scorer of generated text finds separators. A step whose text
contains the separator token is an error (``code="separator"``: the scorer would see a step end
inside it); a truncated response keeps the labels of the steps whose separator survives, and an
example left with none is ``response_truncated``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence

import numpy as np

from prefjax.data.dataset import TokenizedDataset, object_array
from prefjax.data.errors import DataError, DropReport, Row, as_rows

# Fields that are text (or conversations) per kind; everything numeric besides them may become a
# column that travels in batches.
TEXT_FIELDS = {
    "pairwise": ("prompt", "chosen", "rejected"),
    "sft": ("prompt", "completion"),
    "unpaired": ("prompt", "completion"),
    "listwise": ("prompt", "responses"),
    "prompt": ("prompt",),
    "step": ("prompt", "steps"),
}
_RESERVED = {"prompt_id", "label", "ranking", "metadata", "labels"}
# No label at this token of ``step_labels`` (it is not a step's separator).
NO_STEP_LABEL = -1


@dataclasses.dataclass(frozen=True)
class TruncationPolicy:
    """Which side of the prompt and of the responses survives truncation.

    Attributes:
      prompt: ``"keep_end"`` (default: drop the oldest context) or ``"keep_start"``.
      response: ``"keep_start"`` (default) or ``"keep_end"``.
      min_response_len: an example whose (shortest) response keeps fewer tokens than this after
        truncation is reported instead of being trained on.
    """

    prompt: str = "keep_end"
    response: str = "keep_start"
    min_response_len: int = 1

    def __post_init__(self):
        for name in ("prompt", "response"):
            if getattr(self, name) not in ("keep_end", "keep_start"):
                raise ValueError(
                    f"TruncationPolicy.{name} must be 'keep_end' or 'keep_start', "
                    f"got {getattr(self, name)!r}"
                )
        if self.min_response_len < 0:
            raise ValueError("TruncationPolicy.min_response_len must be >= 0")


def _cut(ids: np.ndarray, n: int, side: str) -> np.ndarray:
    if len(ids) <= n:
        return ids
    if n <= 0:
        return ids[:0]
    return ids[-n:] if side == "keep_end" else ids[:n]


def is_conversation(value) -> bool:
    """True for a list of ``{"role", "content"}`` messages."""
    return isinstance(value, list) and all(isinstance(m, Mapping) for m in value)


def prompt_key(prompt) -> str:
    """The canonical string of a prompt (text, or JSON of a conversation): the grouping key
    used by splits and leakage checks when no ``prompt_id`` is given."""
    if isinstance(prompt, str):
        return prompt
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def render_prompt(prompt, tokenizer) -> str:
    """Prompt text: a string as is, a conversation through the chat template with the
    generation prompt appended."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True)


def render_response(prompt, response, tokenizer) -> str:
    """Response text. A conversation response (assistant messages) is rendered after the prompt
    with the chat template and the rendered prompt is removed from the front."""
    if isinstance(response, str):
        return response
    prompt_msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    head = tokenizer.apply_chat_template(list(prompt_msgs), add_generation_prompt=True)
    full = tokenizer.apply_chat_template(list(prompt_msgs) + list(response))
    if not full.startswith(head):
        # Templates that do not render the generation prompt as a prefix of the continued
        # conversation: render the response messages on their own.
        return tokenizer.apply_chat_template(list(response))
    return full[len(head) :]


class _Encoder:
    """Tokenises prompts (cached: built-in tasks and real data repeat prompts) and responses."""

    def __init__(self, tokenizer, add_bos: bool, append_eos: bool):
        self.tok = tokenizer
        bos = getattr(tokenizer, "bos_id", None)
        self.bos = [int(bos)] if (add_bos and bos is not None) else []
        eos = getattr(tokenizer, "eos_id", None)
        if append_eos and eos is None:
            raise ValueError("append_eos=True but the tokenizer has no eos_id")
        self.eos = [int(eos)] if append_eos else []
        self._prompt_cache: dict[str, np.ndarray] = {}

    def prompt(self, prompt) -> np.ndarray:
        key = prompt_key(prompt)
        ids = self._prompt_cache.get(key)
        if ids is None:
            text = render_prompt(prompt, self.tok)
            body = list(self.tok.encode(text))
            # A chat template may already start with BOS; never add a second one.
            head = self.bos if not (self.bos and body[:1] == self.bos) else []
            ids = np.asarray(head + body, np.int32)
            self._prompt_cache[key] = ids
        return ids

    def response(self, prompt, response) -> np.ndarray:
        text = render_response(prompt, response, self.tok)
        return np.asarray(list(self.tok.encode(text)) + self.eos, np.int32)

    def steps(self, row: Row, steps, labels, sep: int) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, step_labels)`` of one step-level response (see the module docstring)."""
        ids: list[int] = []
        out: list[int] = []
        for j, (step, label) in enumerate(zip(steps, labels, strict=True)):
            body = list(self.tok.encode(step))
            if sep in body:
                raise row.error(
                    f"contains the step separator token {sep} (a scorer would end the step "
                    "there); choose another step_separator",
                    field=f"steps[{j}]",
                    code="separator",
                )
            ids += body + [sep]
            out += [NO_STEP_LABEL] * len(body) + [int(label)]
        ids += self.eos
        out += [NO_STEP_LABEL] * len(self.eos)
        return np.asarray(ids, np.int32), np.asarray(out, np.int32)


def step_separator_id(tokenizer, step_separator: str) -> int:
    """The one token id of ``step_separator``; a ``ValueError`` when it encodes to more or less.

    >>> from prefjax.tokenizer import ByteTokenizer
    >>> step_separator_id(ByteTokenizer(), "\\n")
    10
    """
    ids = list(tokenizer.encode(step_separator))
    if len(ids) != 1:
        raise ValueError(
            f"step_separator={step_separator!r} encodes to {len(ids)} tokens {ids}; a step "
            "separator must be exactly one token"
        )
    return int(ids[0])


def _numeric_columns(rows: Sequence[Row], kind: str) -> list[str]:
    """Numeric top-level fields present in every row (they become batch columns)."""
    if not rows:
        return []
    skip = set(TEXT_FIELDS[kind]) | _RESERVED
    names = []
    for name, value in rows[0].data.items():
        if name in skip or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if all(
            isinstance(r.data.get(name), (int, float)) and not isinstance(r.data.get(name), bool)
            for r in rows
        ):
            names.append(name)
    return names


def tokenize(
    records,
    tokenizer,
    kind: str,
    *,
    max_len: int,
    max_prompt_len: int | None = None,
    truncation: TruncationPolicy | None = None,
    add_bos: bool = True,
    append_eos: bool = True,
    on_error: str = "raise",
    source: str | None = None,
    step_separator: str = "\n",
) -> TokenizedDataset:
    """Tokenises normalised examples of one ``kind`` into a :class:`TokenizedDataset`.

    Args:
      records: normalised examples (dicts, or :class:`~prefjax.data.errors.Row` objects that
        carry their file/line for error messages): ``pairwise`` needs ``prompt``, ``chosen``,
        ``rejected``; ``sft`` ``prompt``, ``completion``; ``unpaired`` also ``label`` (0/1);
        ``listwise`` ``prompt``, ``responses`` (best first, or with ``ranking``); ``prompt``
        just ``prompt``. Text fields are strings or conversations. ``prompt_id`` is optional
        (default: the prompt itself); numeric fields present in every row (``margin``, gold
        rewards, ...) become batch columns.
      tokenizer: any object with ``encode``, ``eos_id``, ``bos_id``, ``pad_id`` and
        ``apply_chat_template`` (e.g. ``prefjax.models.ByteTokenizer()``).
      kind: ``pairwise`` | ``sft`` | ``unpaired`` | ``listwise`` | ``prompt``.
      max_len: limit on prompt + response tokens (per response).
      max_prompt_len: limit on prompt tokens (``None``: only ``max_len``).
      truncation: which ends survive (default: end of prompt, start of response).
      add_bos: prepend ``tokenizer.bos_id`` (if not ``None``) to prompts.
      append_eos: append ``tokenizer.eos_id`` to responses.
      on_error: ``"raise"`` the first :class:`DataError`, or ``"drop"`` the row (listed in
        ``dataset.info["dropped"]``, a :class:`DropReport`, and logged).
      source: file name for rows given as plain dicts.
      step_separator: ``step`` kind: the one-token text placed after every step.

    Returns:
      A :class:`TokenizedDataset`; ``info`` holds ``num_prompt_truncated``,
      ``num_response_truncated``, ``num_became_identical`` (pairs equal after truncation) and
      ``dropped``.

    Example:
      >>> class Chars:  # any tokenizer with this interface works
      ...     pad_id, bos_id, eos_id, vocab_size = 0, 1, 2, 259
      ...     def encode(self, text): return [3 + b for b in text.encode()]
      >>> ds = tokenize([{"prompt": "hi", "chosen": "abc", "rejected": "x"}], Chars(),
      ...               "pairwise", max_len=5)
      >>> ds["prompt_ids"][0].tolist(), ds["chosen_ids"][0].tolist()  # abc cut, no EOS
      ([1, 107, 108], [100, 101])
      >>> ds["rejected_ids"][0].tolist()  # "x" + EOS
      [123, 2]
    """
    if kind not in TEXT_FIELDS:
        raise ValueError(f"kind must be one of {tuple(TEXT_FIELDS)}, got {kind!r}")
    if on_error not in ("raise", "drop"):
        raise ValueError(f"on_error must be 'raise' or 'drop', got {on_error!r}")
    if max_len <= 0:
        raise ValueError(f"max_len must be positive, got {max_len}")
    if max_prompt_len is not None and not 0 < max_prompt_len <= max_len:
        raise ValueError(f"max_prompt_len must be in (0, max_len={max_len}], got {max_prompt_len}")
    truncation = truncation or TruncationPolicy()
    rows = as_rows(records, source=source)
    enc = _Encoder(tokenizer, add_bos, append_eos)
    sep = step_separator_id(tokenizer, step_separator) if kind == "step" else None
    extra = _numeric_columns(rows, kind)
    report = DropReport()
    out: dict[str, list] = {name: [] for name in ("prompt_id", "source_index", *extra)}
    tok_cols: dict[str, list] = {
        "pairwise": {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []},
        "sft": {"prompt_ids": [], "response_ids": []},
        "unpaired": {"prompt_ids": [], "response_ids": []},
        "listwise": {"prompt_ids": [], "responses_ids": []},
        "prompt": {"prompt_ids": []},
        "step": {"prompt_ids": [], "response_ids": [], "step_labels": []},
    }[kind]
    labels: list[int] = []
    stats = {"num_prompt_truncated": 0, "num_response_truncated": 0, "num_became_identical": 0}
    p_limit = max_prompt_len if max_prompt_len is not None else max_len

    for row in rows:
        d = row.data
        try:
            for name in TEXT_FIELDS[kind]:
                if name not in d:
                    raise row.error("missing", field=name, code="missing_field")
            prompt = d["prompt"]
            p = enc.prompt(prompt)
            p_cut = _cut(p, p_limit, truncation.prompt)
            step_labels = None
            if kind == "prompt":
                responses, resp_fields = [], []
            elif kind == "step":
                resp_fields = ["steps"]
                ids, step_labels = enc.steps(row, d["steps"], d["labels"], sep)
                responses = [ids]
            elif kind == "pairwise":
                resp_fields = ["chosen", "rejected"]
                responses = [enc.response(prompt, d["chosen"]), enc.response(prompt, d["rejected"])]
            elif kind == "listwise":
                order = d.get("ranking", list(range(len(d["responses"]))))
                resp_fields = [f"responses[{j}]" for j in order]
                responses = [enc.response(prompt, d["responses"][j]) for j in order]
            else:
                resp_fields = ["completion"]
                responses = [enc.response(prompt, d["completion"])]
            room = max_len - len(p_cut)
            cut = [_cut(r, room, truncation.response) for r in responses]
            for name, full, short in zip(resp_fields, responses, cut, strict=True):
                if len(short) < min(truncation.min_response_len, len(full)) or (
                    len(full) > 0 and len(short) == 0
                ):
                    raise row.error(
                        f"response truncated to {len(short)} of {len(full)} tokens "
                        f"(prompt has {len(p)} tokens, max_prompt_len={max_prompt_len}, "
                        f"max_len={max_len}); raise max_len or set max_prompt_len",
                        field=name,
                        code="response_truncated",
                    )
            if step_labels is not None:
                step_labels = _cut(step_labels, room, truncation.response)
                if not (step_labels != NO_STEP_LABEL).any():
                    raise row.error(
                        f"no step's separator survives truncation to {room} response tokens "
                        f"(max_len={max_len}); raise max_len",
                        field="steps",
                        code="response_truncated",
                    )
        except DataError as err:
            if on_error == "raise":
                raise
            report.add(err)
            continue
        stats["num_prompt_truncated"] += int(len(p_cut) < len(p))
        stats["num_response_truncated"] += int(
            any(len(s) < len(f) for s, f in zip(cut, responses, strict=True))
        )
        tok_cols["prompt_ids"].append(p_cut)
        if kind == "pairwise":
            tok_cols["chosen_ids"].append(cut[0])
            tok_cols["rejected_ids"].append(cut[1])
            stats["num_became_identical"] += int(np.array_equal(cut[0], cut[1]))
        elif kind == "listwise":
            tok_cols["responses_ids"].append(object_array(cut))
        elif kind != "prompt":
            tok_cols["response_ids"].append(cut[0])
        if kind == "step":
            tok_cols["step_labels"].append(step_labels)
        if kind == "unpaired":
            labels.append(int(d["label"]))
        out["prompt_id"].append(str(d["prompt_id"]) if "prompt_id" in d else prompt_key(prompt))
        out["source_index"].append(-1 if row.index is None else int(row.index))
        for name in extra:
            out[name].append(d[name])

    report.kept = len(out["prompt_id"])
    columns = {name: object_array(v) for name, v in tok_cols.items()}
    columns["prompt_id"] = object_array(out["prompt_id"])
    columns["source_index"] = np.asarray(out["source_index"], np.int64)
    for name in extra:
        vals = np.asarray(out[name])
        # Margins are real numbers even when a file writes them as integers.
        floating = vals.dtype.kind == "f" or name == "margin"
        columns[name] = vals.astype(np.float32) if floating else vals
    if kind == "unpaired":
        columns["label"] = np.asarray(labels, np.int32)
    info = dict(stats, dropped=report)
    return TokenizedDataset(
        kind,
        columns,
        pad_id=tokenizer.pad_id,
        max_len=max_len,
        max_prompt_len=max_prompt_len,
        info=info,
    )
