"""Run directories keep one run each: identity, resume rules, locks, clean failure, metrics.

Each test reproduces one way a run directory used to be silently corrupted (another launcher
taking it over, a resumption under another config or other data, a crash that duplicated the
step-0 evaluation) and checks that it is now refused, or recorded, without touching a file.
"""

import json
import os

import numpy as np
import pytest

from experiments.configs import reward_model as reward_config
from prefjax.data import RepeatTask, write_jsonl
from prefjax.train import dpo, loop, reward
from prefjax.train import logging as metric_logging
from prefjax.train import workdir as run_dir
from tests.train.test_loop import (  # noqa: F401  (the module's compilation-cache fixture)
    NUM_STEPS,
    _compilation_cache,
    host,
    records,
    tiny_config,
)


def snapshot(root) -> dict:
    """Every file under ``root`` with its size and modification time (what "untouched" means)."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            st = os.stat(path)
            if name != run_dir.LOCK_FILE:  # the lock names its holder; it holds no result
                out[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny DPO run (its directory must not be written to by the tests)."""
    workdir = str(tmp_path_factory.mktemp("finished") / "run")
    result = loop.run(tiny_config(), workdir, dpo)
    assert result.status == "finished"
    return workdir


def test_another_algorithm_is_refused_and_nothing_moves(finished):
    # Before: the reward model called DPO's checkpoints "unreadable", moved them aside and
    # appended its records to the DPO run's metrics.jsonl.
    before = snapshot(finished)
    config = reward_config.get_config()
    config.data.num_train, config.train.num_steps, config.optimizer.warmup_steps = 64, 2, 1
    with pytest.raises(run_dir.WorkdirError, match=r"holds a 'dpo' run .*trains 'reward'"):
        loop.run(config, finished, reward)
    assert snapshot(finished) == before
    assert not os.path.exists(os.path.join(finished, "checkpoints_incomplete"))


def test_changed_config_is_refused_naming_each_field(finished):
    # Before: "resumed from step 6 (final)", nothing trained, summary retitled "dpo (ipo)".
    before = snapshot(finished)
    changed = tiny_config(**{"algorithm.loss": "ipo", "algorithm.beta": 0.2})
    with pytest.raises(run_dir.WorkdirError) as err:
        loop.run(changed, finished, dpo)
    message = str(err.value)
    assert "config.algorithm.loss: 'sigmoid' -> 'ipo'" in message
    assert "config.algorithm.beta: 0.5 -> 0.2" in message
    assert "2 field(s)" in message and "resume_with_changes=true" in message
    assert snapshot(finished) == before


def test_preempted_run_resumed_with_another_learning_rate_is_refused(tmp_path):
    workdir = str(tmp_path / "run")
    loop.run(tiny_config(), workdir, dpo, stop_after_steps=2)
    with pytest.raises(run_dir.WorkdirError, match=r"optimizer\.learning_rate: 0\.003 -> 0\.001"):
        loop.run(tiny_config(**{"optimizer.learning_rate": 1e-3}), workdir, dpo)


def test_resume_with_changes_is_recorded_in_run_json_and_summary(tmp_path):
    workdir = str(tmp_path / "run")
    loop.run(tiny_config(), workdir, dpo, stop_after_steps=2)
    changed = tiny_config(**{"algorithm.beta": 0.2, "train.resume_with_changes": True})
    result = loop.run(changed, workdir, dpo)
    assert result.status == "finished" and result.step == NUM_STEPS
    record = json.load(open(os.path.join(workdir, "run.json")))
    assert len(record["invocations"]) == 2
    overrides = [c for c in record["invocations"][1]["changes"] if c["kind"] == "override"]
    assert overrides == [{"field": "algorithm.beta", "old": 0.5, "new": 0.2, "kind": "override"}]
    assert record["config"]["algorithm"]["beta"] == 0.2  # the config in force now
    summary = open(os.path.join(workdir, "summary.txt")).read()
    assert "resumed with 1 change(s)" in summary.splitlines()[0]
    assert "from step 2: algorithm.beta: 0.5 -> 0.2" in summary


def test_free_fields_may_differ_and_num_steps_extends_the_run(tmp_path):
    workdir = str(tmp_path / "run")
    loop.run(tiny_config(), workdir, dpo)
    longer = tiny_config(**{"train.num_steps": NUM_STEPS + 2, "checkpoint.keep": 3})
    result = loop.run(longer, workdir, dpo)
    assert result.step == NUM_STEPS + 2
    assert [r["step"] for r in records(workdir) if r["split"] == "train"] == [2, 4, 6, 8]
    changes = json.load(open(os.path.join(workdir, "run.json")))["invocations"][1]["changes"]
    assert {c["field"]: c["kind"] for c in changes} == {
        "train.num_steps": "free",
        "checkpoint.keep": "free",
    }
    assert "resumed with" not in open(os.path.join(workdir, "summary.txt")).read()


def test_free_field_list_is_what_the_docs_say():
    assert run_dir.is_free("logging.plot") and run_dir.is_free("mesh.fsdp")
    assert not run_dir.is_free("train.nonfinite") and not run_dir.is_free("algorithm.beta")
    docs = open(os.path.join(os.path.dirname(__file__), "../../docs/training.md")).read()
    for field in run_dir.FREE_FIELDS:
        assert f"`{field}`" in docs, f"docs/training.md does not list the free field {field}"


def _pairs_file(path, num=96):
    unique = {}
    for r in RepeatTask().pairwise_records(300, seed=0):
        unique.setdefault((r["prompt"], r["chosen"], r["rejected"]), r)
    rows = list(unique.values())[:num]
    write_jsonl(str(path), rows)
    return rows


def test_a_data_file_edited_under_the_same_config_is_refused(tmp_path):
    path = tmp_path / "prefs.jsonl"
    rows = _pairs_file(path)
    files = {"data.task": "files", "data.train_files": str(path)}
    workdir = str(tmp_path / "run")
    loop.run(tiny_config(**files), workdir, dpo, stop_after_steps=2)
    write_jsonl(str(path), rows[:-4])  # same path, four rows fewer
    with pytest.raises(run_dir.WorkdirError, match="data differ from the data this run"):
        loop.run(tiny_config(**files), workdir, dpo)
    write_jsonl(str(path), rows)  # restored: the run resumes
    assert loop.run(tiny_config(**files), workdir, dpo).step == NUM_STEPS


def test_a_directory_that_is_not_a_run_is_refused_untouched(tmp_path):
    (tmp_path / "notes.txt").write_text("my results")
    with pytest.raises(run_dir.WorkdirError, match=r"is not empty \(notes\.txt\) and has no"):
        loop.run(tiny_config(), str(tmp_path), dpo)
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]
    assert (tmp_path / "notes.txt").read_text() == "my results"


def test_a_directory_in_use_by_a_live_run_is_refused(tmp_path):
    workdir = str(tmp_path / "run")
    holder = run_dir.Workdir(workdir, "dpo", {}).open()  # as a run in another process would
    try:
        with pytest.raises(run_dir.WorkdirError, match=r"in use by a running job \(pid \d+"):
            loop.run(tiny_config(), workdir, dpo)
    finally:
        holder.release()
    # The lock went with its holder: the directory can be used again.
    run_dir.Workdir(workdir, "dpo", {}).open().release()


def test_a_run_failing_before_its_first_step_leaves_no_workdir(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "d", "chosen": "e"}\n'
    )
    config = tiny_config(**{"data.task": "files", "data.train_files": str(bad)})
    workdir = tmp_path / "new"
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: field 'rejected'"):
        loop.run(config, str(workdir), dpo)
    assert not workdir.exists()
    empty = tmp_path / "empty"  # a directory the user made stays, and stays empty
    empty.mkdir()
    with pytest.raises(ValueError, match="rejected"):
        loop.run(config, str(empty), dpo)
    assert empty.exists() and not os.listdir(empty)


def test_a_resumed_run_failing_on_its_data_keeps_everything(tmp_path):
    path = tmp_path / "prefs.jsonl"
    _pairs_file(path)
    config = tiny_config(**{"data.task": "files", "data.train_files": str(path)})
    workdir = str(tmp_path / "run")
    loop.run(config, workdir, dpo, stop_after_steps=2)
    before = snapshot(workdir)
    path.write_text(path.read_text() + '{"prompt": "x", "chosen": "y"}\n')
    with pytest.raises(ValueError, match="rejected"):
        loop.run(config, workdir, dpo)
    assert snapshot(workdir) == before


def test_crash_before_the_first_checkpoint_keeps_one_step0_evaluation(tmp_path):
    # Before: the rerun appended a second step-0 evaluation to the crashed attempt's.
    config = tiny_config(**{"train.eval_every": 2, "checkpoint.every": 0})
    workdir = str(tmp_path / "run")

    def crash(step, state, metrics):
        if step == 3:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        loop.run(config, workdir, dpo, step_hook=crash)
    assert [r["step"] for r in records(workdir) if r["split"] == "eval"] == [0, 2]
    result = loop.run(config, workdir, dpo)
    assert result.step == NUM_STEPS
    keys = [(r["step"], r["split"]) for r in records(workdir)]
    assert len(keys) == len(set(keys))
    assert [s for s, split in keys if split == "eval"] == [0, 2, 4, 6]


def test_resumed_logging_window_matches_an_uninterrupted_run(tmp_path):
    # A stop at step 3 (between logging steps 2 and 4): the record at step 4 averages steps 3
    # and 4 as in an uninterrupted run, not step 4 alone.
    full = str(tmp_path / "full")
    loop.run(tiny_config(), full, dpo)
    split = str(tmp_path / "split")
    loop.run(tiny_config(), split, dpo, stop_after_steps=3)
    loop.run(tiny_config(), split, dpo)

    def train(workdir):
        return [
            {k: v for k, v in r.items() if k not in ("split", "time", "steps_per_second")}
            for r in records(workdir)
            if r["split"] == "train"
        ]

    a, b = train(full), train(split)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [2, 4, 6]
    for ra, rb in zip(a, b, strict=True):
        for k in ra:
            np.testing.assert_allclose(rb[k], ra[k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_export_folder_holding_other_files_is_refused(tmp_path):
    target = tmp_path / "export"
    target.mkdir()
    (target / "model.safetensors").write_text("someone else's model")
    config = tiny_config(**{"export.hf": True, "export.dir": str(target)})
    with pytest.raises(run_dir.WorkdirError, match="not this run's earlier export"):
        loop.run(config, str(tmp_path / "run"), dpo)
    assert (target / "model.safetensors").read_text() == "someone else's model"
    assert not (tmp_path / "run").exists()


def test_metrics_file_cut_short_by_a_crash_is_repaired(tmp_path):
    writer = metric_logging.MetricWriter(str(tmp_path), tensorboard=False, console=False)
    writer.write(2, {"loss": 1.0})
    writer.write(4, {"loss": 0.5})
    with open(writer.path, "a") as f:
        f.write('{"step": 6, "split": "tr')  # the process died here
    assert [r["step"] for r in metric_logging.read_records(writer.path)] == [2, 4]
    writer.truncate_after(2)
    assert [r["step"] for r in metric_logging.read_records(writer.path)] == [2]
    assert open(writer.path).read().endswith("}\n")
    with open(writer.path, "a") as f:  # damage anywhere but the last line is an error
        f.write("garbage\n" + json.dumps({"step": 8, "split": "train"}) + "\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not a JSON record"):
        metric_logging.read_records(writer.path)


def test_console_lines_say_what_they_show():
    line = metric_logging.format_line(20, {"loss": 4.09}, "train", note="mean of steps 1-20")
    assert line.startswith("[train] step 20 (mean of steps 1-20) | loss 4.09")


def test_data_fingerprint_sees_every_column(tmp_path):
    from prefjax.data import tokenize
    from prefjax.models import ByteTokenizer

    rows = [{"prompt": "a", "chosen": "b", "rejected": "c", "prompt_id": "1"}]
    tok = ByteTokenizer()
    base = tokenize(rows, tok, "pairwise", max_len=16)
    same = tokenize([dict(rows[0])], tok, "pairwise", max_len=16)
    other = tokenize([{**rows[0], "rejected": "d"}], tok, "pairwise", max_len=16)
    fp = run_dir.data_fingerprint
    assert fp([base]) == fp([same]) != fp([other])
    assert fp([base]) != fp([base.add_columns(margin=np.ones(1, np.float32))])
    assert host  # (the shared helpers are used above)
