"""What importing prefjax.data loads: no TFDS, no TensorFlow, no prefjax.models.

Each check runs in a fresh interpreter, since the test session has long imported everything.
"""

import json
import subprocess
import sys

import prefjax.models
from prefjax.data import DropReport, build_tfds, read_records, write_jsonl
from prefjax.data import validate as validate_mod
from prefjax.tokenizer import ByteTokenizer

# Modules that prefjax.data must not load until TFDS data is built or read (tensorflow_datasets)
# or ever (tensorflow; prefjax.models: data and models do not import each other).
_SCRIPT = """
import json, sys
{imports}
def banned(m):
    top = m.split(".")[0]
    return top in ("tensorflow", "tensorflow_datasets") or m.startswith("prefjax.models")
print(json.dumps(sorted(m for m in sys.modules if banned(m))))
"""


def _banned_modules_after(imports: str) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT.format(imports=imports)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return json.loads(proc.stdout.splitlines()[-1])


def test_import_prefjax_data_loads_no_tfds_tensorflow_or_models():
    assert _banned_modules_after("import prefjax.data") == []


def test_data_commands_and_tfds_builder_import_no_tfds_tensorflow_or_models():
    imports = "import prefjax.data.validate, prefjax.data.benchmark, prefjax.data.tfds_builder"
    assert _banned_modules_after(imports) == []


def test_tfds_folder_reads_in_a_fresh_process(tmp_path):
    records = [{"prompt": f"q{i}", "chosen": "yes", "rejected": "no"} for i in range(3)]
    write_jsonl(tmp_path / "train.jsonl", records)
    data_dir = str(tmp_path / "tfds")
    builder = build_tfds(str(tmp_path / "train.jsonl"), data_dir=data_dir)
    script = f"""
import json, sys
import prefjax.data
before = "tensorflow_datasets" in sys.modules
by_dir = prefjax.data.read_records({builder.data_dir!r}, kind="pairwise")
by_name = prefjax.data.read_tfds("prefjax_preferences/pairwise", data_dir={data_dir!r})
print(json.dumps({{
    "before": before,
    "after": "tensorflow_datasets" in sys.modules,
    "tensorflow": "tensorflow" in sys.modules,
    "by_dir": [r.data for r in by_dir],
    "by_name": [r.data for r in by_name],
}}))
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True
    )
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["before"] is False and out["after"] is True and out["tensorflow"] is False
    assert out["by_dir"] == records and out["by_name"] == records


_TEXTS = [
    "",
    "hi",
    "héllo wörld ✓ 日本語",
    "<|user|>2+2?<|end|><|assistant|>4<|end|>",
    "<bos>a<eos><pad><unk><|system|>",
    "<|assistant <|end| <not special> <",
    "tab\tnew\nline\r\n",
]
_CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]


def test_data_byte_tokenizer_agrees_with_models_byte_tokenizer():
    ours, theirs = ByteTokenizer(), prefjax.models.ByteTokenizer()
    for attr in ("vocab_size", "pad_id", "bos_id", "eos_id", "chat_template"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    for text in _TEXTS:
        for special in (False, True):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == theirs.encode(text, add_special_tokens=special), text
            assert ours.decode(ids) == theirs.decode(ids)
            assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(
                ids, skip_special_tokens=True
            )
    for gen in (False, True):
        assert ours.apply_chat_template(_CHAT, add_generation_prompt=gen) == (
            theirs.apply_chat_template(_CHAT, add_generation_prompt=gen)
        )


def test_validate_token_lengths_same_under_both_byte_tokenizers(tmp_path):
    records = [
        {"prompt": "q1", "chosen": "long answer", "rejected": "no"},
        {
            "prompt": [{"role": "user", "content": "héllo?"}],
            "chosen": [{"role": "assistant", "content": "<|end|> ✓"}],
            "rejected": [{"role": "assistant", "content": "nope"}],
        },
    ]
    write_jsonl(tmp_path / "d.jsonl", records)
    rows = read_records(str(tmp_path / "d.jsonl"), kind="pairwise")
    reports = [
        validate_mod.report_rows("pairwise", rows, DropReport(), tok, len(rows))
        for tok in (validate_mod._tokenizer(""), prefjax.models.ByteTokenizer())
    ]
    assert reports[0] == reports[1]
    assert reports[0]["token_lengths"]["chosen"]["max"] == 11
