"""What a run directory is, and the rules that keep one run's results from mixing with another's.

Every run directory holds ``run.json``, written when the run first claims the directory::

    {"format": 1, "algorithm": "dpo", "prefjax_version": "0.1.0", "created": 1764650000.0,
     "config": {...},            # the config in force now (the last accepted invocation's)
     "data_fingerprint": "sha256:...",  # of the tokenised train + held-out data
     "invocations": [{"started": ..., "prefjax_version": ..., "resumed_from_step": 200,
                      "changes": [{"field": "train.num_steps", "old": 200, "new": 400,
                                   "kind": "free"}]}, ...]}

Before anything is written, :meth:`Workdir.open` checks the directory against the run about to
start:

* a directory that does not exist, or exists and is empty, is claimed: ``run.json`` is written;
* a directory with a ``run.json`` of **another algorithm** is refused;
* a directory with a ``run.json`` of the same algorithm is resumed only when the config differs
  in nothing that changes the result (:data:`FREE_FIELDS` may differ), naming each differing
  field with its old and new value otherwise; ``train.resume_with_changes=true`` accepts the
  changes, which are then recorded in ``run.json`` and printed in ``summary.txt``;
* a non-empty directory without ``run.json`` (another program's files, or not a prefjax run) is
  refused;
* a directory that another live process holds (a lock taken with ``fcntl.flock``, released by
  the kernel when that process ends, however it ends) is refused.

After the data is built, :meth:`Workdir.check_data` compares its fingerprint with the recorded
one, so editing a data file under an unchanged config path is caught as well.

A refusal raises :class:`WorkdirError` with what differs and how to proceed, and writes nothing.
Nothing here moves or deletes a file, with one exception: a directory this invocation created
itself is removed again by :meth:`Workdir.discard` when the run fails before its first step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import glob
import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

import prefjax

RUN_FILE = "run.json"
LOCK_FILE = ".lock"
FORMAT = 1

# Config fields that cannot change what a run computes, so they may differ between the
# invocations of one run (a prefix covers its sub-fields). Everything else is compared.
FREE_FIELDS = (
    "train.num_steps",  # extend (or shorten) a run; the schedule follows the new length
    "train.log_every",  # console / metrics.jsonl cadence
    "train.eval_every",  # held-out evaluation cadence (evaluation never touches the weights)
    "train.resume_with_changes",  # the override itself
    "logging",  # progress bar, TensorBoard, curves
    "checkpoint.every",  # checkpoint cadence
    "checkpoint.keep",  # how many checkpoints are kept
    "export",  # the end-of-run Hugging Face export
    "workdir_default",  # only used when --workdir is not given
    "mesh",  # the device layout (results agree to float rounding; a resumed job may get
    # other hardware)
    "algorithm.reference_cache_dir",  # where precomputed reference log-probs are kept (a hit
    # loads exactly what a miss computes)
    "algorithm.train_entropy",  # a train-step metric outside the gradient (DPO family)
)
# Files a run writes into its directory; a directory holding only these (and no run.json)
# is one whose very first invocation stopped before it could write run.json.
_OWN_FILES = (LOCK_FILE, RUN_FILE + ".tmp")


class WorkdirError(RuntimeError):
    """The run directory belongs to another run, or the run would mix two configs or datasets."""


@dataclasses.dataclass(frozen=True)
class Change:
    """One config field that differs from the recorded run."""

    field: str
    old: Any
    new: Any
    free: bool  # in FREE_FIELDS: cannot change a result

    def describe(self) -> str:
        return f"config.{self.field}: {_show(self.old)} -> {_show(self.new)}"

    def as_json(self) -> dict:
        return {
            "field": self.field,
            "old": self.old,
            "new": self.new,
            "kind": "free" if self.free else "override",
        }


class _Missing:
    def __repr__(self):
        return "(absent)"


MISSING = _Missing()


def _show(value) -> str:
    return repr(value) if value is not MISSING else "(absent)"


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """``{"train.num_steps": 200, ...}`` from a nested dict (lists become tuples)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, path + "."))
        else:
            out[path] = _freeze(value)
    return out


def _freeze(value):
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def is_free(field: str) -> bool:
    return any(field == f or field.startswith(f + ".") for f in FREE_FIELDS)


def config_changes(old: Mapping, new: Mapping) -> list[Change]:
    """Every field whose value differs between two configs (as JSON dicts), sorted by name."""
    a, b = flatten(old), flatten(new)
    changes = []
    for field in sorted(set(a) | set(b)):
        va, vb = a.get(field, MISSING), b.get(field, MISSING)
        if va != vb:
            changes.append(Change(field, _thaw(va), _thaw(vb), is_free(field)))
    return changes


def _thaw(value):
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


def data_fingerprint(datasets: Sequence[Any]) -> str:
    """A SHA-256 of tokenised datasets: every column's name, dtype and values, in order.

    Two runs get the same fingerprint exactly when they train and evaluate on the same token
    sequences with the same per-example columns (labels, margins, prompt ids).
    """
    h = hashlib.sha256()
    for ds in datasets:
        h.update(f"dataset kind={ds.kind} n={len(ds)} max_len={ds.max_len}\n".encode())
        for name in sorted(ds.columns):
            h.update(f"column {name}\n".encode())
            _hash_array(h, ds.columns[name])
    return "sha256:" + h.hexdigest()


def _hash_array(h, array) -> None:
    array = np.asarray(array)
    if array.dtype != object:
        h.update(f"{array.dtype.str}{array.shape}".encode())
        h.update(np.ascontiguousarray(array).tobytes())
        return
    h.update(f"object[{len(array)}]".encode())
    for item in array:
        if isinstance(item, str):
            h.update(b"s" + len(item.encode()).to_bytes(8, "little") + item.encode())
        elif isinstance(item, np.ndarray) and item.dtype != object:
            h.update(b"a" + item.dtype.str.encode() + len(item).to_bytes(8, "little"))
            h.update(np.ascontiguousarray(item).tobytes())
        elif isinstance(item, (np.ndarray, list, tuple)):
            _hash_array(h, np.asarray(list(item) if not isinstance(item, np.ndarray) else item))
        else:
            h.update(b"r" + repr(item).encode())


def _how_to_proceed(path: str) -> str:
    return (
        f"To start a separate run, pass another --workdir (or remove {path} yourself if its "
        "results are not needed)."
    )


class Workdir:
    """The identity check, lock and bookkeeping of one run directory (process 0 writes).

    Args:
      path: the run directory (absolute).
      algorithm: ``config.algorithm.name`` of the run about to start.
      config_json: its config as a JSON dict.
      allow_changes: ``train.resume_with_changes``: accept result-changing differences.
      is_main: process 0 (the only one that writes; the others only read).
      parent: the enclosing run's :class:`Workdir` for a stage run inside it (SFT warm-up).
    """

    def __init__(
        self,
        path: str,
        algorithm: str,
        config_json: dict,
        *,
        allow_changes: bool = False,
        is_main: bool = True,
        parent: Workdir | None = None,
    ):
        self.path = os.path.abspath(path)
        self.algorithm = algorithm
        self.config_json = config_json
        self.allow_changes = allow_changes
        self.is_main = is_main
        self.parent = parent
        self.created = False  # this invocation made the directory
        self.claimed = False  # this invocation claimed a new or empty directory
        self.restart = False  # a recorded run without any checkpoint: nothing to resume
        self.stepped = False  # an optimiser step was taken under it in this invocation
        self.changes: list[Change] = []
        self.record: dict = {}
        self._lock = None

    # -- opening -------------------------------------------------------------------------------
    def open(self) -> Workdir:
        """Checks the directory (see the module docstring), takes the lock, claims or resumes."""
        run_file = os.path.join(self.path, RUN_FILE)
        if not os.path.exists(self.path):
            if self.is_main:
                os.makedirs(self.path)
                self.created = True
        elif not os.path.isdir(self.path):
            raise WorkdirError(f"workdir {self.path} is a file, not a directory")
        self._refuse_foreign(run_file)  # before the lock file is written into it
        self._take_lock()
        try:
            self._refuse_foreign(run_file)  # again, now that no other run can be creating it
            if os.path.exists(run_file):
                self.record = self._read(run_file)
                self._check_resumable()
            else:
                self.claimed = self.is_main  # everything in it from now on is this run's
                self.record = {
                    "format": FORMAT,
                    "algorithm": self.algorithm,
                    "prefjax_version": prefjax.__version__,
                    "created": time.time(),
                    "config": self.config_json,
                    "data_fingerprint": None,
                    "invocations": [],
                }
                self._write()
        except BaseException:
            self.release()
            raise
        return self

    def _refuse_foreign(self, run_file: str) -> None:
        if os.path.exists(run_file):
            return
        others = sorted(set(os.listdir(self.path)) - set(_OWN_FILES))
        if others:
            shown = ", ".join(others[:6]) + (", ..." if len(others) > 6 else "")
            raise WorkdirError(
                f"workdir {self.path} is not empty ({shown}) and has no {RUN_FILE}: it was not "
                "made by a prefjax run (or by one older than run identities), so nothing in it "
                f"is touched. {_how_to_proceed(self.path)}"
            )

    def _read(self, run_file: str) -> dict:
        try:
            with open(run_file) as f:
                record = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            raise WorkdirError(
                f"{run_file} cannot be read ({err}); the directory's identity is unknown, so it "
                f"is left as it is. {_how_to_proceed(self.path)}"
            ) from None
        if not isinstance(record, dict) or "algorithm" not in record or "config" not in record:
            raise WorkdirError(f"{run_file} is not a prefjax run record")
        return record

    def _check_resumable(self) -> None:
        recorded = self.record["algorithm"]
        if recorded != self.algorithm:
            raise WorkdirError(
                f"workdir {self.path} holds a {recorded!r} run ({RUN_FILE}); this launcher "
                f"trains {self.algorithm!r}. Its checkpoints and metrics are left untouched. "
                f"{_how_to_proceed(self.path)}"
            )
        self.changes = config_changes(self.record["config"], self.config_json)
        binding = [c for c in self.changes if not c.free]
        if binding and not self.has_checkpoint():
            # Its first invocation stopped before any checkpoint: there is nothing to splice
            # onto, so the run starts again under the new config (recorded as a restart).
            self.restart = True
            return
        if binding and not self.allow_changes:
            listed = "\n".join(f"  {c.describe()}" for c in binding)
            raise WorkdirError(
                f"workdir {self.path} holds a {recorded!r} run whose config differs from this "
                f"one in {len(binding)} field(s) that change the result:\n{listed}\n"
                "Resuming would splice one run out of two configs. Either pass the recorded "
                "values again, pass --workdir=<a new directory> to start a separate run, or "
                "pass --config.train.resume_with_changes=true to continue this run under the "
                "new values (the change is recorded in run.json and summary.txt)."
            )

    def has_checkpoint(self) -> bool:
        """Whether the run (or a stage inside it) has a committed checkpoint to resume from."""
        patterns = ("checkpoints/*/commit_success.txt", "*/checkpoints/*/commit_success.txt")
        return any(glob.glob(os.path.join(glob.escape(self.path), p)) for p in patterns)

    def _take_lock(self) -> None:
        if not self.is_main:
            return
        lock_path = os.path.join(self.path, LOCK_FILE)
        handle = open(lock_path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise WorkdirError(
                f"workdir {self.path} is in use by a running job ({holder}); two runs in one "
                "directory would mix their results. Wait for it to finish, or pass another "
                "--workdir."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        self._lock = handle

    def release(self) -> None:
        """Releases the lock (also released by the kernel if the process dies)."""
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    # -- after the data is built ----------------------------------------------------------------
    def check_data(self, fingerprint: str) -> None:
        """Refuses a resumed run whose tokenised data differs from the recorded data."""
        recorded = self.record.get("data_fingerprint")
        if recorded and recorded != fingerprint and not self.allow_changes:
            raise WorkdirError(
                f"workdir {self.path}: the tokenised train/held-out data differ from the data "
                f"this run was trained on (fingerprint {recorded[:19]}... recorded, "
                f"{fingerprint[:19]}... now), although the config names the same sources: a "
                "data file was edited or replaced. Restore the original data, pass another "
                "--workdir, or pass --config.train.resume_with_changes=true to continue on the "
                "new data (recorded in run.json)."
            )
        self._data_change = recorded if recorded and recorded != fingerprint else None
        self.record["data_fingerprint"] = fingerprint

    def begin(self, resumed_from_step: int) -> None:
        """Records this invocation (and any accepted changes) in ``run.json``."""
        entry = {
            "started": time.time(),
            "prefjax_version": prefjax.__version__,
            "resumed_from_step": int(resumed_from_step),
            "changes": [c.as_json() for c in self.changes],
        }
        if self.restart:
            entry["restart"] = "no checkpoint to resume from: started again under this config"
            for c in entry["changes"]:
                c["kind"] = "restart"
        if getattr(self, "_data_change", None):
            entry["data_changed_from"] = self._data_change
        self.record.setdefault("invocations", []).append(entry)
        self.record["config"] = self.config_json
        self._write()
        if self.is_main:  # the config in force, beside the checkpoints (as before run.json)
            with open(os.path.join(self.path, "config.json"), "w") as f:
                json.dump(self.config_json, f, indent=2, sort_keys=True)

    def mark_ended(self, status: str, step: int, reason: str, *, trained: bool) -> None:
        """Records in ``run.json`` that this invocation ended the run early (``status``, e.g.
        ``"stopped"``, at ``step`` for ``reason``; ``trained``: whether it trained up to the
        stop, or found the run already ended)."""
        entry = {"status": status, "step": int(step), "reason": reason, "trained": trained}
        self.record.setdefault("invocations", [{}])[-1]["ended"] = entry
        self._write()

    def mark_step(self) -> None:
        self.stepped = True
        if self.parent is not None:
            self.parent.mark_step()

    def accepted_changes(self) -> list[dict]:
        """Every result-changing change accepted over the run's life, with the step it took
        effect at (what ``summary.txt`` lists)."""
        out = []
        for inv in self.record.get("invocations", []):
            for c in inv.get("changes", []):
                if c.get("kind") == "override":
                    out.append({**c, "step": inv.get("resumed_from_step", 0)})
            if inv.get("data_changed_from"):
                out.append(
                    {
                        "field": "data (fingerprint)",
                        "old": inv["data_changed_from"][:19] + "...",
                        "new": self.record["data_fingerprint"][:19] + "...",
                        "step": inv.get("resumed_from_step", 0),
                    }
                )
        return out

    def _write(self) -> None:
        if not self.is_main:
            return
        path = os.path.join(self.path, RUN_FILE)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.record, f, indent=2, sort_keys=True, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic: a crash leaves the old or the new record, never half

    # -- the end-of-run export ----------------------------------------------------------------
    EXPORT_MARK = "prefjax_export.json"

    def check_export_dir(self, export_dir: str) -> None:
        """Refuses an export folder that holds anything but this run's own earlier export."""
        if not export_dir or not os.path.isdir(export_dir) or not os.listdir(export_dir):
            return
        mark = os.path.join(export_dir, self.EXPORT_MARK)
        owner = None
        if os.path.exists(mark):
            with contextlib.suppress(OSError, json.JSONDecodeError):
                owner = json.load(open(mark)).get("workdir")
        if owner != self.path:
            raise WorkdirError(
                f"config.export.dir={export_dir!r} is not empty and is not this run's earlier "
                "export: the export would overwrite its files. Choose an empty or new folder."
            )

    def mark_export(self, export_dir: str) -> None:
        with open(os.path.join(export_dir, self.EXPORT_MARK), "w") as f:
            json.dump({"workdir": self.path, "time": time.time()}, f)

    # -- failure before the first step ------------------------------------------------------------
    def discard(self) -> bool:
        """Undoes a claim that no step came of: a run that failed on its config or data before
        its first step leaves no directory it created (and an empty directory it claimed empty
        again). Returns whether it removed anything."""
        self.release()
        if self.stepped or not self.is_main or not os.path.isdir(self.path):
            return False
        if self.created:
            shutil.rmtree(self.path)
            return True
        if self.claimed:  # the user's empty directory: everything in it is ours
            for name in os.listdir(self.path):
                full = os.path.join(self.path, name)
                shutil.rmtree(full) if os.path.isdir(full) and not os.path.islink(full) else (
                    os.remove(full)
                )
            return True
        return False
