"""Example schemas, recognised public layouts, and row-level validation.

Six kinds of example, each normalised to one dict layout (text fields are strings or
conversations, i.e. lists of ``{"role": str, "content": str}`` messages):

=========  ======================================================================================
kind       normalised fields (optional in brackets)
=========  ======================================================================================
pairwise   ``prompt, chosen, rejected`` [``prompt_id``, ``margin``, numeric fields, ``metadata``]
listwise   ``prompt, responses`` (>= 2), ``ranking`` (a permutation, best first) [``prompt_id``]
unpaired   ``prompt, completion, label`` (1 desirable / 0 undesirable) [``prompt_id``]
sft        ``prompt, completion`` [``prompt_id``]
prompt     ``prompt`` [``prompt_id``]
step       ``prompt, steps`` (>= 1 strings), ``labels`` (one 0/1 per step: 1 the solution is still
           correct after this step) [``prompt_id``, numeric fields]; TRL's stepwise layout
           ``prompt, completions, labels`` is read as the same (process reward models)
=========  ======================================================================================

Recognised input layouts (:func:`normalize`):

* explicit ``prompt`` / ``chosen`` / ``rejected`` (strings or conversations);
* full conversations in ``chosen`` / ``rejected`` with no ``prompt`` (Anthropic HH): the prompt
  is their longest common prefix, cut back to the last ``"\\n\\nAssistant:"`` marker (or, for
  other text, to a whitespace boundary) so neither response starts mid-word; for message lists
  the prompt is the longest common run of leading messages;
* message lists whose leading messages repeat the prompt (UltraFeedback ``chosen`` /
  ``rejected``): the repeated messages become the prompt conversation;
* ``prompt`` + ``response_a`` / ``response_b`` + a binary ``label`` (0/1, "a"/"b");
* ``messages`` conversations for SFT (the last assistant message is the completion) and for
  prompts (all messages);
* ``scores`` instead of ``ranking`` for listwise data; ``response`` for ``completion``.

Every problem raises a :class:`~prefjax.data.errors.DataError` naming file, line/record and
field, with a ``code``: ``missing_field``, ``wrong_type``, ``empty``, ``identical``, ``label``,
``tie``, ``ranking``, ``duplicate``, ``layout``, ``kind`` (a row of another kind than the
file's detected one).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence

from prefjax.data.errors import DataError, DropReport, Row
from prefjax.data.tokenize import is_conversation, prompt_key

KINDS = ("pairwise", "listwise", "unpaired", "sft", "prompt", "step")
HH_ASSISTANT_MARKER = "\n\nAssistant:"
_TRUE_LABELS = {"1": 1, "0": 0, "true": 1, "false": 0, "desirable": 1, "undesirable": 0}
_AB_LABELS = {
    0: "a",
    1: "b",
    "a": "a",
    "b": "b",
    "A": "a",
    "B": "b",
    "0": "a",
    "1": "b",
    "response_a": "a",
    "response_b": "b",
}


_PAIRWISE_KEYS = frozenset({"chosen", "rejected", "response_a", "response_b"})
_LISTWISE_KEYS = frozenset({"responses", "ranking", "scores"})
# Step-level (process) supervision: ``steps`` or TRL's ``completions``, with per-step ``labels``.
_STEP_KEYS = frozenset({"steps", "completions", "labels"})


def detect_kind(record: Mapping) -> str:
    """Guesses the kind of one raw record from its keys.

    A key only one kind has decides, even when the kind's other keys are missing, so a
    malformed row is never taken for a valid row of another kind (normalising it then names the
    missing field): any of ``chosen`` / ``rejected`` / ``response_a`` / ``response_b`` is
    pairwise; ``responses`` / ``ranking`` / ``scores`` listwise; ``steps`` / ``completions`` /
    ``labels`` step; ``label`` unpaired;
    ``completion`` / ``response`` / ``messages`` sft; ``prompt`` alone prompt.

    >>> detect_kind({"prompt": "q", "chosen": "a"})  # 'rejected' is missing, not a prompt row
    'pairwise'
    """
    keys = set(record)
    if keys & _PAIRWISE_KEYS:
        return "pairwise"
    if keys & _LISTWISE_KEYS:
        return "listwise"
    if keys & _STEP_KEYS:
        return "step"
    if "label" in keys:
        return "unpaired"
    if {"completion", "response"} & keys or "messages" in keys:
        return "sft"
    if "prompt" in keys:
        return "prompt"
    raise DataError(f"cannot tell the kind of record with keys {sorted(keys)}", code="layout")


def _row_kind(row: Row) -> str | None:
    """The kind of one row, or ``None`` when its keys say nothing."""
    if not isinstance(row.data, Mapping):
        return None
    try:
        return detect_kind(row.data)
    except DataError:
        return None


def _kind_of(rows: Sequence[Row], kinds: Sequence[str | None]) -> str:
    counts = Counter(k for k in kinds if k is not None)
    if not counts:
        if not rows:
            raise DataError("no records to detect the kind from; pass kind=", code="empty")
        first = rows[0]
        keys = sorted(first.data) if isinstance(first.data, Mapping) else type(first.data).__name__
        raise first.error(f"cannot tell the kind of record with keys {keys}", code="layout")
    return counts.most_common(1)[0][0]  # ties: the kind seen first (Counter keeps that order)


def detect_kind_of_rows(rows: Sequence[Row | Mapping]) -> str:
    """The kind of a file (or list) of raw records: the most common :func:`detect_kind` of its
    rows, ties going to the kind seen first. One malformed row, first or not, does not decide
    the kind of the rest; rows whose keys fit no kind do not vote.

    Raises:
      DataError: no row fits any kind (located at the first row), or there are no rows.

    >>> detect_kind_of_rows([{"prompt": "q"}, {"prompt": "q", "chosen": "a", "rejected": "b"},
    ...                      {"prompt": "r", "chosen": "a", "rejected": "b"}])
    'pairwise'
    """
    rows = [r if isinstance(r, Row) else Row(r, index=i) for i, r in enumerate(rows)]
    return _kind_of(rows, [_row_kind(r) for r in rows])


# ------------------------------------------------------------------------------ field checks
def check_text(row: Row, field: str, value, *, allow_empty: bool = False):
    """A text field: a non-empty string or a non-empty conversation of role/content messages."""
    if isinstance(value, str):
        if not allow_empty and not value.strip():
            raise row.error("empty string", field=field, code="empty")
        return value
    if isinstance(value, list):
        if not value:
            raise row.error("empty conversation", field=field, code="empty")
        for j, m in enumerate(value):
            where = f"{field}[{j}]"
            if not isinstance(m, Mapping):
                raise row.error(
                    f"message must be an object with role/content, got {type(m).__name__}",
                    field=where,
                    code="wrong_type",
                )
            for key in ("role", "content"):
                if key not in m:
                    raise row.error(f"message has no '{key}'", field=where, code="missing_field")
                if not isinstance(m[key], str):
                    raise row.error(
                        f"'{key}' must be a string, got {type(m[key]).__name__}",
                        field=f"{where}.{key}",
                        code="wrong_type",
                    )
            if not m["content"].strip() and not allow_empty:
                raise row.error("empty message content", field=f"{where}.content", code="empty")
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise row.error(
        f"must be a string or a list of {{role, content}} messages, got {type(value).__name__}",
        field=field,
        code="wrong_type",
    )


def _require(row: Row, *fields):
    for f in fields:
        if f not in row.data:
            raise row.error(
                f"missing (record has {sorted(row.data)})", field=f, code="missing_field"
            )
        if row.data[f] is None:
            raise row.error("is null", field=f, code="missing_field")


def _prompt_id(row: Row, out: dict):
    if "prompt_id" in row.data and row.data["prompt_id"] is not None:
        pid = row.data["prompt_id"]
        if isinstance(pid, bool) or not isinstance(pid, (str, int)):
            raise row.error(
                f"must be a string or an integer, got {type(pid).__name__}",
                field="prompt_id",
                code="wrong_type",
            )
        if isinstance(pid, str) and not pid.strip():
            raise row.error("empty string", field="prompt_id", code="empty")
        out["prompt_id"] = str(pid)


def _numeric(row: Row, out: dict, skip: set):
    """Copy optional numeric fields (margin, scores, gold rewards) and metadata through."""
    for key, value in row.data.items():
        if key in skip or key in out:
            continue
        if key == "metadata":
            out["metadata"] = value
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            if isinstance(value, float) and not math.isfinite(value):
                raise row.error(f"must be finite, got {value}", field=key, code="wrong_type")
            out[key] = value
    if "margin" in row.data and not isinstance(row.data["margin"], (int, float)):
        raise row.error(
            f"must be a number, got {type(row.data['margin']).__name__}",
            field="margin",
            code="wrong_type",
        )


# ---------------------------------------------------------------------------- prefix splits
def split_common_prefix(chosen: str, rejected: str, *, marker: str = HH_ASSISTANT_MARKER):
    """Splits two full transcripts into ``(prompt, chosen_response, rejected_response)``.

    The prompt is the longest common prefix, cut back to the end of the last ``marker``
    inside it (Anthropic HH: ``"...\\n\\nAssistant:"``, the responses keep their leading space);
    without a marker it is cut back to just after the last whitespace so no word is split.

    >>> split_common_prefix("\\n\\nHuman: Hi\\n\\nAssistant: Hello!",
    ...                     "\\n\\nHuman: Hi\\n\\nAssistant: Go away")
    ('\\n\\nHuman: Hi\\n\\nAssistant:', ' Hello!', ' Go away')
    """
    n = 0
    limit = min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    common = chosen[:n]
    cut = common.rfind(marker) if marker else -1
    if cut >= 0:
        n = cut + len(marker)
    elif n < limit or len(chosen) != len(rejected):
        # Back up to a whitespace boundary unless the prefix already ends on one.
        while n > 0 and not common[n - 1].isspace():
            n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


def split_common_messages(chosen: list, rejected: list):
    """Longest common leading run of messages -> ``(prompt, chosen_rest, rejected_rest)``."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    return chosen[:n], chosen[n:], rejected[n:]


# ------------------------------------------------------------------------------- normalisers
def _pairwise(row: Row) -> dict:
    d = row.data
    out: dict = {}
    skip = {
        "prompt",
        "chosen",
        "rejected",
        "response_a",
        "response_b",
        "label",
        "prompt_id",
        "preference",
        "winner",
    }
    if "response_a" in d or "response_b" in d:
        _require(row, "prompt", "response_a", "response_b")
        label_field = next((k for k in ("label", "preference", "winner") if k in d), None)
        if label_field is None:
            raise row.error(
                "missing (need 'label' 0/1 or 'a'/'b')", field="label", code="missing_field"
            )
        raw = d[label_field]
        side = _AB_LABELS.get(raw) if isinstance(raw, (str, int)) else None
        if side is None:
            code = "tie" if raw in ("tie", "both", "neither") or raw == 0.5 else "label"
            raise row.error(
                f"must be a binary choice (0/1 or 'a'/'b'), got {raw!r}",
                field=label_field,
                code=code,
            )
        prompt = check_text(row, "prompt", d["prompt"])
        a = check_text(row, "response_a", d["response_a"])
        b = check_text(row, "response_b", d["response_b"])
        chosen, rejected = (a, b) if side == "a" else (b, a)
        names = ("response_a", "response_b") if side == "a" else ("response_b", "response_a")
    else:
        _require(row, "chosen", "rejected")
        chosen = check_text(row, "chosen", d["chosen"])
        rejected = check_text(row, "rejected", d["rejected"])
        names = ("chosen", "rejected")
        if "label" in d:
            # A preference row that carries its own label must agree with its field names.
            if d["label"] not in ("chosen", True, 1):
                raise row.error(
                    f"must be 'chosen' (or true/1) for a prompt/chosen/rejected row, "
                    f"got {d['label']!r}",
                    field="label",
                    code="label",
                )
        if "prompt" in d:
            prompt = check_text(row, "prompt", d["prompt"])
            if is_conversation(chosen) and is_conversation(rejected):
                head, c_rest, r_rest = split_common_messages(chosen, rejected)
                if head:  # UltraFeedback: the conversations repeat the prompt
                    user_text = [m["content"] for m in head if m["role"] == "user"]
                    if isinstance(prompt, str) and prompt not in user_text:
                        raise row.error(
                            "the conversations in chosen/rejected start with messages that do "
                            "not contain the prompt",
                            field="prompt",
                            code="layout",
                        )
                    if isinstance(prompt, list) and prompt != head:
                        raise row.error(
                            "prompt conversation differs from the messages shared by chosen "
                            "and rejected",
                            field="prompt",
                            code="layout",
                        )
                    prompt, chosen, rejected = head, c_rest, r_rest
        else:
            # Anthropic HH layout: split the shared prefix off.
            if isinstance(chosen, str) and isinstance(rejected, str):
                prompt, chosen, rejected = split_common_prefix(chosen, rejected)
            elif is_conversation(chosen) and is_conversation(rejected):
                prompt, chosen, rejected = split_common_messages(chosen, rejected)
            else:
                raise row.error(
                    "chosen and rejected must both be strings or both conversations "
                    "when there is no prompt",
                    field="rejected",
                    code="wrong_type",
                )
            if not prompt:
                raise row.error(
                    "no prompt field, and chosen/rejected share no prefix to split off",
                    field="prompt",
                    code="missing_field",
                )
    if chosen == rejected:
        raise row.error(f"identical to '{names[0]}'", field=names[1], code="identical")
    for name, value in zip(names, (chosen, rejected), strict=True):
        if (isinstance(value, str) and not value.strip()) or (
            isinstance(value, list) and not value
        ):
            raise row.error("empty after splitting off the shared prompt", field=name, code="empty")
    if "score_chosen" in d and "score_rejected" in d:
        sc, sr = d["score_chosen"], d["score_rejected"]
        for key, v in (("score_chosen", sc), ("score_rejected", sr)):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise row.error(f"must be a number, got {v!r}", field=key, code="wrong_type")
        if sc == sr:
            raise row.error(
                f"tie: score_chosen == score_rejected == {sc}", field="score_rejected", code="tie"
            )
        if sc < sr:
            raise row.error(
                f"score_chosen={sc} < score_rejected={sr}: label contradicts scores",
                field="score_chosen",
                code="label",
            )
    out.update(prompt=prompt, chosen=chosen, rejected=rejected)
    _prompt_id(row, out)
    _numeric(row, out, skip)
    return out


def _listwise(row: Row) -> dict:
    d = row.data
    _require(row, "prompt", "responses")
    prompt = check_text(row, "prompt", d["prompt"])
    ys = d["responses"]
    if not isinstance(ys, list):
        raise row.error(
            f"must be a list, got {type(ys).__name__}", field="responses", code="wrong_type"
        )
    if len(ys) < 2:
        raise row.error(
            f"needs at least 2 responses, got {len(ys)}", field="responses", code="ranking"
        )
    ys = [check_text(row, f"responses[{j}]", y) for j, y in enumerate(ys)]
    keys = [prompt_key(y) for y in ys]
    for j, k in enumerate(keys):
        if k in keys[:j]:
            raise row.error(
                f"identical to responses[{keys.index(k)}]",
                field=f"responses[{j}]",
                code="identical",
            )
    if "ranking" in d:
        rk = d["ranking"]
        if not isinstance(rk, list) or any(
            isinstance(i, bool) or not isinstance(i, int) for i in rk
        ):
            raise row.error(
                f"must be a list of integer response indices, got {rk!r}",
                field="ranking",
                code="wrong_type",
            )
        if sorted(rk) != list(range(len(ys))):
            raise row.error(
                f"must be a permutation of 0..{len(ys) - 1}, got {rk}",
                field="ranking",
                code="ranking",
            )
        ranking = list(rk)
    elif "scores" in d:
        sc = d["scores"]
        if (
            not isinstance(sc, list)
            or len(sc) != len(ys)
            or any(isinstance(s, bool) or not isinstance(s, (int, float)) for s in sc)
        ):
            raise row.error(
                f"must be {len(ys)} numbers, got {sc!r}", field="scores", code="wrong_type"
            )
        if len(set(sc)) != len(sc):
            raise row.error(f"tied scores {sc}", field="scores", code="tie")
        ranking = sorted(range(len(ys)), key=lambda j: -sc[j])
    else:
        raise row.error("missing (or give 'scores')", field="ranking", code="missing_field")
    out = {"prompt": prompt, "responses": ys, "ranking": ranking}
    _prompt_id(row, out)
    _numeric(row, out, {"prompt", "responses", "ranking", "scores", "prompt_id"})
    return out


def _completion_field(row: Row) -> str:
    return "completion" if "completion" in row.data or "response" not in row.data else "response"


def _messages_split(row: Row):
    msgs = check_text(row, "messages", row.data["messages"])
    if not isinstance(msgs, list):
        raise row.error("must be a list of messages", field="messages", code="wrong_type")
    if msgs[-1]["role"] != "assistant" or len(msgs) < 2:
        raise row.error(
            "must end with an assistant message after at least one other message",
            field="messages",
            code="layout",
        )
    return msgs[:-1], [msgs[-1]]


def _unpaired(row: Row) -> dict:
    d = row.data
    cf = _completion_field(row)
    _require(row, "prompt", cf, "label")
    raw = d["label"]
    if isinstance(raw, bool):
        label = int(raw)
    elif isinstance(raw, (int, float)):
        label = int(raw) if raw in (0, 1) else None
    elif isinstance(raw, str):
        label = _TRUE_LABELS.get(raw.strip().lower())
    else:
        label = None
    if label is None:
        raise row.error(
            f"must be binary (true/false or 1/0), got {raw!r}", field="label", code="label"
        )
    out = {
        "prompt": check_text(row, "prompt", d["prompt"]),
        "completion": check_text(row, cf, d[cf]),
        "label": label,
    }
    _prompt_id(row, out)
    _numeric(row, out, {"prompt", cf, "label", "prompt_id"})
    return out


def _sft(row: Row) -> dict:
    d = row.data
    if "messages" in d and "prompt" not in d:
        prompt, completion = _messages_split(row)
    else:
        cf = _completion_field(row)
        _require(row, "prompt", cf)
        prompt = check_text(row, "prompt", d["prompt"])
        completion = check_text(row, cf, d[cf])
    out = {"prompt": prompt, "completion": completion}
    _prompt_id(row, out)
    _numeric(row, out, {"prompt", "completion", "response", "messages", "prompt_id"})
    return out


def _prompt(row: Row) -> dict:
    d = row.data
    if "prompt" not in d and "messages" in d:
        prompt = check_text(row, "messages", d["messages"])
    else:
        _require(row, "prompt")
        prompt = check_text(row, "prompt", d["prompt"])
    out = {"prompt": prompt}
    _prompt_id(row, out)
    _numeric(row, out, {"prompt", "messages", "prompt_id"})
    return out


def _step_label(row: Row, field: str, raw) -> int:
    """One step's label: true/false, 1/0 or their strings (``"+"``/``"-"``, as PRM800K rates)."""
    if isinstance(raw, bool):
        return int(raw)
    if isinstance(raw, (int, float)) and raw in (0, 1):
        return int(raw)
    if isinstance(raw, str) and raw.strip().lower() in {**_TRUE_LABELS, "+": 1, "-": 0}:
        return {**_TRUE_LABELS, "+": 1, "-": 0}[raw.strip().lower()]
    raise row.error(f"must be binary (true/false or 1/0), got {raw!r}", field=field, code="label")


def _step(row: Row) -> dict:
    d = row.data
    sf = "steps" if "steps" in d or "completions" not in d else "completions"
    _require(row, "prompt", sf, "labels")
    prompt = check_text(row, "prompt", d["prompt"])
    steps, labels = d[sf], d["labels"]
    for name, value in ((sf, steps), ("labels", labels)):
        if not isinstance(value, list):
            raise row.error(
                f"must be a list, got {type(value).__name__}", field=name, code="wrong_type"
            )
    if not steps:
        raise row.error("needs at least one step", field=sf, code="empty")
    for j, step in enumerate(steps):
        if not isinstance(step, str):
            raise row.error(
                f"a step must be a string, got {type(step).__name__}",
                field=f"{sf}[{j}]",
                code="wrong_type",
            )
        if not step.strip():
            raise row.error("empty step", field=f"{sf}[{j}]", code="empty")
    if len(labels) != len(steps):
        raise row.error(
            f"has {len(labels)} labels for {len(steps)} steps (one per step)",
            field="labels",
            code="label",
        )
    out = {
        "prompt": prompt,
        "steps": list(steps),
        "labels": [_step_label(row, f"labels[{j}]", x) for j, x in enumerate(labels)],
    }
    _prompt_id(row, out)
    _numeric(row, out, {"prompt", sf, "labels", "prompt_id"})
    return out


_NORMALIZERS = {
    "step": _step,
    "pairwise": _pairwise,
    "listwise": _listwise,
    "unpaired": _unpaired,
    "sft": _sft,
    "prompt": _prompt,
}


def normalize(row: Row | Mapping, kind: str) -> Row:
    """Validates one record and returns it in the normalised layout of ``kind``.

    Raises:
      DataError: naming the row's file, line/record and the offending field.

    Example:
      >>> hh = {"chosen": "\\n\\nHuman: 2+2?\\n\\nAssistant: 4",
      ...       "rejected": "\\n\\nHuman: 2+2?\\n\\nAssistant: 5"}
      >>> normalize(hh, "pairwise").data["prompt"]
      '\\n\\nHuman: 2+2?\\n\\nAssistant:'
      >>> normalize({"prompt": "q", "chosen": "a", "rejected": "a"}, "pairwise")
      Traceback (most recent call last):
      ...
      prefjax.data.errors.DataError: field 'rejected': identical to 'chosen'
    """
    if kind not in _NORMALIZERS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not isinstance(row, Row):
        row = Row(dict(row))
    if not isinstance(row.data, Mapping):
        raise row.error(
            f"record must be an object, got {type(row.data).__name__}", code="wrong_type"
        )
    return Row(_NORMALIZERS[kind](row), row.source, row.index, row.index_kind)


_DEDUP_FIELDS = {
    "pairwise": "prompt, chosen, rejected",
    "listwise": "prompt, responses, ranking",
    "unpaired": "prompt, completion, label",
    "sft": "prompt, completion",
    "prompt": "prompt",
    "step": "prompt, steps",
}


def _dedup_key(kind: str, d: dict):
    if kind == "pairwise":
        return (prompt_key(d["prompt"]), prompt_key(d["chosen"]), prompt_key(d["rejected"]))
    if kind == "listwise":
        return (
            prompt_key(d["prompt"]),
            json.dumps([prompt_key(y) for y in d["responses"]]),
            tuple(d["ranking"]),
        )
    if kind == "unpaired":
        return (prompt_key(d["prompt"]), prompt_key(d["completion"]), d["label"])
    if kind == "sft":
        return (prompt_key(d["prompt"]), prompt_key(d["completion"]))
    if kind == "step":
        return (prompt_key(d["prompt"]), json.dumps(d["steps"]))
    return (prompt_key(d["prompt"]), d.get("prompt_id"))


def validate_rows(
    rows: Sequence[Row | Mapping],
    kind: str | None = None,
    *,
    on_error: str = "raise",
    allow_duplicates: bool = False,
    max_stored_errors: int | None = None,
):
    """Normalises and validates rows, including cross-row duplicate checks.

    Args:
      rows: raw records (``Row`` objects keep their file/line for messages).
      kind: example kind; ``None`` detects it over all rows (:func:`detect_kind_of_rows`), and
        a row that normalises as that kind but whose own keys say another kind (a pairwise row
        in prompt data) is then an error (``code="kind"``); give ``kind`` to read every row as
        that kind (the prompts of pairwise rows, say).
      on_error: ``"raise"`` the first error; ``"drop"`` bad rows (each listed in the report
        and logged); ``"collect"`` like drop but without logging (for reports).
      allow_duplicates: accept exact duplicate examples (otherwise they are errors); they are
        still counted in the report's ``duplicates`` (i.i.d. samples of a synthetic task repeat
        legitimately).
      max_stored_errors: keep at most this many errors in the report (later ones are counted
        by code only); ``None`` keeps all.

    Returns:
      ``(kind, good_rows, report)``: normalised rows, and a :class:`DropReport`; its
      ``contradictions`` attribute lists ``(first, row)`` pairs whose reverse also occurs (a
      warning, not an error: annotators disagree), ``duplicates`` the accepted duplicates.
    """
    if on_error not in ("raise", "drop", "collect"):
        raise ValueError(f"on_error must be 'raise', 'drop' or 'collect', got {on_error!r}")
    rows = [r if isinstance(r, Row) else Row(r, index=i) for i, r in enumerate(rows)]
    report = DropReport(max_stored=max_stored_errors)
    row_kinds = None
    if kind is None:
        row_kinds = [_row_kind(r) for r in rows]
        kind = _kind_of(rows, row_kinds)
    seen: dict = {}
    good: list[Row] = []
    for i, row in enumerate(rows):
        try:
            norm = normalize(row, kind)
            if row_kinds is not None and row_kinds[i] not in (None, kind):
                raise row.error(
                    f"a {row_kinds[i]} row in data detected as {kind} (the kind of most rows; "
                    f"pass kind={kind!r} to read every row as {kind})",
                    code="kind",
                )
            key = _dedup_key(kind, norm.data)
            if key in seen and allow_duplicates:
                report.duplicates.append((seen[key], row))
            elif key in seen:
                first = seen[key]
                where = (
                    first.error("").location()
                    if first.source != row.source
                    else f"line {first.index}"
                    if first.index_kind == "line"
                    else f"record {first.index}"
                )
                raise row.error(
                    f"duplicate of {where}",
                    field=_DEDUP_FIELDS[kind],
                    code="duplicate",
                )
            seen.setdefault(key, row)
            if kind == "pairwise":
                rev = (key[0], key[2], key[1])
                if rev in seen:
                    report.contradictions.append((seen[rev], row))
        except DataError as err:
            if on_error == "raise":
                raise
            if on_error == "drop":
                report.add(err)
            else:
                report.record(err)
            continue
        good.append(norm)
    report.kept = len(good)
    return kind, good, report
