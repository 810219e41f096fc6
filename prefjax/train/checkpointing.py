"""Orbax checkpoints of a run: train state, data-iterator position and config, resumable.

A checkpoint is one orbax step directory ``<workdir>/checkpoints/<step>/`` holding four items:

* ``state``: the :class:`~prefjax.train.state.TrainState` (step, trainable params, optimiser
  state), restored with the shardings of the freshly built state, so a resumed run is laid out on
  the mesh exactly as a new one;
* ``data``: the train iterator's ``get_state()`` dict, so a resumed run sees the batches it would
  have seen;
* ``config``: the run's config as JSON (what produced the checkpoint);
* ``meta``: the step, wall-clock time and why the checkpoint was written, plus the loop's
  logging window in progress and its count of skipped steps.

Writes are atomic (orbax writes to a temporary directory, writes ``commit_success.txt`` and then
renames). On resumption :meth:`Checkpointer.restore_latest` takes the newest *complete* step: a step
directory without the commit file, or one whose files fail to restore, is moved aside to
``<workdir>/checkpoints_incomplete/`` with a warning and the next older step is used, so an
interrupted write never costs more than the checkpoint being written.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp
from absl import logging

COMMIT_FILE = "commit_success.txt"
ITEMS = ("state", "data", "config", "meta")


class Restored(NamedTuple):
    """A restored checkpoint."""

    step: int
    state: Any
    data_state: dict
    meta: dict


class Checkpointer:
    """Periodic, final and on-demand checkpoints of a run with a keep-the-newest-N policy.

    Args:
      directory: where step directories live (created if missing).
      keep: number of newest checkpoints kept.
      every: periodic cadence in steps (0 = only explicit ``force=True`` saves).
      async_save: write in a background thread after the arrays reached host memory.
    """

    def __init__(self, directory: str, *, keep: int, every: int, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self.every = every
        self._manager = self._open(keep, async_save)
        self._keep, self._async = keep, async_save

    def _open(self, keep: int, async_save: bool) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            # Leftover temporary directories of an interrupted write are removed at start-up.
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        )
        return ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def should_save(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def save(
        self,
        step: int,
        state,
        data_state: dict,
        config_json: dict,
        *,
        reason: str = "periodic",
        meta: dict | None = None,
    ) -> bool:
        """Writes a checkpoint at ``step`` (a no-op if that step already exists).

        ``meta`` adds JSON-able entries to the ``meta`` item (the loop stores its logging
        window there, so a resumed run's first record averages the same steps).
        """
        if step in self._manager.all_steps():
            return False
        meta = {**(meta or {}), "step": int(step), "time": time.time(), "reason": reason}
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(config_json),
            meta=ocp.args.JsonSave(meta),
        )
        return self._manager.save(step, args=args, force=True)

    def wait(self) -> None:
        """Blocks until a background write has finished (call before exiting)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def _set_aside(self, step: int, why: str) -> None:
        src = os.path.join(self.directory, str(step))
        dst_root = self.directory.rstrip("/") + "_incomplete"
        dst = os.path.join(dst_root, f"{step}-{int(time.time())}")
        logging.warning("Checkpoint step %d in %s is %s; moved to %s.", step, src, why, dst)
        print(f"WARNING: checkpoint {src} is {why}; ignoring it (moved to {dst}).", flush=True)
        if jax.process_index() == 0 and os.path.exists(src):
            os.makedirs(dst_root, exist_ok=True)
            shutil.move(src, dst)
        self._manager.reload()

    def restore_latest(self, abstract_state) -> Restored | None:
        """Restores the newest complete checkpoint into ``abstract_state``'s structure/shardings.

        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` (with shardings) or of arrays
        whose shapes and shardings the restored arrays take. Returns ``None`` when the directory
        holds no complete checkpoint.
        """
        abstract_state = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        for step in sorted(self._manager.all_steps(), reverse=True):
            if not os.path.exists(os.path.join(self.directory, str(step), COMMIT_FILE)):
                self._set_aside(step, "incomplete (no commit marker: its write was interrupted)")
                continue
            try:
                restored = self._manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state),
                        data=ocp.args.JsonRestore(),
                        meta=ocp.args.JsonRestore(),
                    ),
                )
            except Exception as err:  # a damaged step: fall back to the previous one
                self._set_aside(step, f"unreadable ({type(err).__name__}: {err})"[:300])
                continue
            return Restored(step, restored.state, dict(restored.data), dict(restored.meta))
        return None


def restore_params(run_dir: str):
    """Host copies of the params in another run's newest complete checkpoint (``init_from``)."""
    directory = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"config.model.init_from={run_dir!r}: no checkpoints/ folder in it")
    manager = ocp.CheckpointManager(directory, item_names=ITEMS)
    try:
        for step in sorted(manager.all_steps(), reverse=True):
            if os.path.exists(os.path.join(directory, str(step), COMMIT_FILE)):
                state = manager.restore(
                    step, args=ocp.args.Composite(state=ocp.args.StandardRestore())
                ).state
                return jax.device_get(state["params"])
    finally:
        manager.close()
    raise FileNotFoundError(f"config.model.init_from={run_dir!r}: no complete checkpoint")
