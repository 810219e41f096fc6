"""A TFDS dataset builder for local preference files (``array_record``, no TensorFlow needed).

:class:`PreferenceFiles` turns local JSONL / JSON / Parquet files into a TFDS dataset stored as
``array_record`` shards, validated on the way in with the same checks as the loaders. The
result reads back through ``tfds.data_source`` (random access, which is what grain wants)
without TensorFlow, so it can sit in a researcher's TFDS catalogue beside public datasets::

    builder = build_tfds({"train": ["train.jsonl"], "eval": ["eval.jsonl"]}, data_dir="~/tfds")
    rows = read_tfds("prefjax_preferences/pairwise", data_dir="~/tfds", split="train")
    # or any TFDS tool: tfds.data_source("prefjax_preferences/pairwise", data_dir="~/tfds")

One builder config per example kind (``pairwise``, ``listwise``, ``unpaired``, ``sft``,
``prompt``). Text fields are ``Text`` features; a conversation is stored as its JSON in the same
feature with ``<field>_is_conversation`` set. Other per-example fields (numeric extras such as
``margin`` or gold rewards, ``metadata``) travel as JSON in ``extra``. ``source_file`` and
``source_index`` keep the provenance of each row; file order is preserved. Reading back is
:func:`prefjax.data.readers.read_tfds`.

``tensorflow_datasets`` is imported when a dataset is built, not when this module is imported:
the builder class (:func:`builder_class`) is made on first use.
"""

from __future__ import annotations

import functools
import json
import os

import numpy as np

from prefjax.data.errors import Row
from prefjax.data.readers import TFDS_TEXT_FIELDS, read_records
from prefjax.data.schemas import KINDS, detect_kind_of_rows, validate_rows

NAME = "prefjax_preferences"


def _features(kind: str):
    # tensorflow_datasets is an optional heavy dependency: imported only when a dataset is built.
    import tensorflow_datasets as tfds

    feats = {
        "prompt_id": tfds.features.Text(),
        "extra": tfds.features.Text(),
        "source_file": tfds.features.Text(),
        "source_index": np.int64,
    }
    for name in TFDS_TEXT_FIELDS[kind]:
        feats[name] = tfds.features.Text()
        feats[name + "_is_conversation"] = np.bool_
    if kind == "listwise":
        feats["responses"] = tfds.features.Sequence(tfds.features.Text())
        feats["responses_is_conversation"] = np.bool_
        feats["ranking"] = tfds.features.Sequence(np.int32)
    if kind == "unpaired":
        feats["label"] = np.int32
    return tfds.features.FeaturesDict(feats)


def _enc(value) -> tuple[str, bool]:
    if isinstance(value, str):
        return value, False
    return json.dumps(value, ensure_ascii=False), True


@functools.cache
def builder_class():
    """The TFDS builder class :class:`PreferenceFiles`, made (and registered with TFDS) once."""
    # tensorflow_datasets is an optional heavy dependency: imported only when a dataset is built.
    import tensorflow_datasets as tfds

    class PreferenceFiles(tfds.core.GeneratorBasedBuilder):
        """TFDS builder over local preference / feedback / prompt / SFT files.

        Args (besides the usual ``data_dir``, ``config`` = the example kind):
          split_files: ``{split: [paths]}`` of local JSONL / JSON / Parquet files (needed only to
            prepare; reading back a prepared dataset needs none).
          on_error: ``"raise"`` on the first invalid row, or ``"drop"`` it (every dropped row is
            logged with its file, line and reason; the dropped rows are in ``self.drop_reports``).
        """

        name = NAME
        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "Local preference files as array_record."}
        BUILDER_CONFIGS = [
            tfds.core.BuilderConfig(name=k, description=f"{k} examples") for k in KINDS
        ]
        # No downloads and no checksums file: skip TFDS's lookup of them next to the module
        # (that lookup needs the optional `importlib_resources` package for packaged modules).
        url_infos = {}

        def __init__(self, *, split_files: dict | None = None, on_error: str = "raise", **kwargs):
            self._split_files = {k: list(v) for k, v in (split_files or {}).items()}
            self._on_error = on_error
            self.drop_reports = {}
            super().__init__(**kwargs)

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description="Preference data converted from local files by prefjax.data.",
                features=_features(self.builder_config.name),
                homepage="https://github.com/prefjax/prefjax",
                # Keep file order (integer keys 0, 1, ... in reading order): example i of a split
                # is the i-th valid row of its files, which keeps provenance readable.
                disable_shuffling=True,
            )

        def _split_generators(self, dl_manager):
            if not self._split_files:
                raise ValueError("PreferenceFiles needs split_files={split: [paths]} to prepare")
            return {
                split: self._generate_examples(split, files)
                for split, files in self._split_files.items()
            }

        def _generate_examples(self, split, files):
            kind = self.builder_config.name
            rows = [row for path in files for row in read_records(os.fspath(path))]
            _, good, report = validate_rows(
                rows, kind, on_error="raise" if self._on_error == "raise" else "drop"
            )
            self.drop_reports[split] = report
            for i, row in enumerate(good):
                yield i, _to_example(kind, row)

    return PreferenceFiles


def _to_example(kind: str, row: Row) -> dict:
    d = dict(row.data)
    ex = {
        "prompt_id": str(d.pop("prompt_id", "")),
        "source_file": str(row.source or ""),
        "source_index": -1 if row.index is None else int(row.index),
    }
    for name in TFDS_TEXT_FIELDS[kind]:
        ex[name], ex[name + "_is_conversation"] = _enc(d.pop(name))
    if kind == "listwise":
        ys = d.pop("responses")
        is_conv = not all(isinstance(y, str) for y in ys)
        ex["responses"] = [json.dumps(y, ensure_ascii=False) if is_conv else y for y in ys]
        ex["responses_is_conversation"] = is_conv
        ex["ranking"] = np.asarray(d.pop("ranking"), np.int32)
    if kind == "unpaired":
        ex["label"] = int(d.pop("label"))
    ex["extra"] = json.dumps(d, ensure_ascii=False)
    return ex


def build_tfds(
    split_files,
    *,
    data_dir: str,
    kind: str | None = None,
    on_error: str = "raise",
):
    """Prepares a ``prefjax_preferences/<kind>`` TFDS dataset from local files.

    Args:
      split_files: ``{split: path or [paths]}``, or a path / list of paths (split ``train``).
      data_dir: the TFDS data directory to write into.
      kind: example kind; ``None`` detects it from the records of the first file.
      on_error: ``"raise"`` or ``"drop"`` (see :class:`PreferenceFiles`).

    Returns:
      The prepared :class:`PreferenceFiles` builder (``builder.as_data_source(split)`` reads it
      back; ``builder.drop_reports`` holds the dropped rows per split).
    """
    # tensorflow_datasets is an optional heavy dependency: imported only when a dataset is built.
    import tensorflow_datasets as tfds

    if isinstance(split_files, (str, os.PathLike)):
        split_files = {"train": [split_files]}
    elif isinstance(split_files, (list, tuple)):
        split_files = {"train": list(split_files)}
    split_files = {
        s: [f] if isinstance(f, (str, os.PathLike)) else list(f) for s, f in split_files.items()
    }
    if kind is None:
        # read_records raises a DataError naming an empty file
        kind = detect_kind_of_rows(read_records(os.fspath(next(iter(split_files.values()))[0])))
    builder = builder_class()(
        split_files=split_files,
        on_error=on_error,
        config=kind,
        data_dir=os.path.expanduser(data_dir),
        file_format="array_record",
    )
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
        )
    )
    return builder
