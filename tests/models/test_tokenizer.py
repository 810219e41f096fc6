"""Tokenizers: the built-in byte tokenizer and a ``tokenizer.json`` folder built here."""

import json

import pytest

import prefjax.models as pm
from prefjax.tokenizer import BYTE_CHAT_TEMPLATE, BYTE_SPECIAL_TOKENS, _compile_jinja

# A ChatML-style template written as a model folder would ship it.
CHATML = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
]


def test_byte_tokenizer_round_trip():
    tok = pm.ByteTokenizer()
    assert tok.vocab_size == 264 and tok.vocab_size % 8 == 0
    assert len({tok.pad_id, tok.bos_id, tok.eos_id}) == 3
    text = "héllo wörld ✓ 🙂 <b>not special</b>"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))  # plain text is its UTF-8 bytes
    assert tok.decode(ids) == text
    assert tok.encode(text, add_special_tokens=True) == [tok.bos_id] + ids


def test_byte_tokenizer_special_tokens():
    tok = pm.ByteTokenizer()
    ids = tok.encode("<|user|>hi<|end|><eos>")
    assert ids == [tok.token_to_id("<|user|>"), 104, 105, tok.token_to_id("<|end|>"), tok.eos_id]
    assert tok.decode(ids) == "<|user|>hi<|end|><eos>"
    assert tok.decode(ids, skip_special_tokens=True) == "hi"
    assert [tok.token_to_id(s) for s in BYTE_SPECIAL_TOKENS] == list(range(256, 264))
    with pytest.raises(ValueError, match="outside"):
        tok.decode([999])
    # A split multi-byte character decodes to the replacement character, not an exception.
    assert tok.decode([0xC3]) == "\ufffd"


def test_byte_chat_template_matches_its_jinja_form():
    tok = pm.ByteTokenizer()
    for gen in (False, True):
        expected = _compile_jinja(BYTE_CHAT_TEMPLATE).render(
            messages=MESSAGES, add_generation_prompt=gen
        )
        assert tok.apply_chat_template(MESSAGES, add_generation_prompt=gen) == expected
    assert tok.apply_chat_template(MESSAGES[1:2], add_generation_prompt=True) == (
        "<|user|>What is 2+2?<|end|><|assistant|>"
    )
    with pytest.raises(ValueError, match="role"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


def _build_folder(path, *, template_in_config=True):
    """A byte-level BPE tokenizer trained on a few sentences, saved as a model folder would be."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = ["the quick brown fox jumps over the lazy dog", "What is 2+2? It is 4.", "héllo"] * 5
    tokenizer.train_from_iterator(corpus, trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    tokenizer.save(str(path / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": {"content": "<|im_end|>"}, "pad_token": "<pad>"}
    if template_in_config:
        config["chat_template"] = CHATML
    else:
        (path / "chat_template.jinja").write_text(CHATML)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return tokenizer


@pytest.mark.parametrize("template_in_config", [True, False], ids=["config", "jinja_file"])
def test_load_tokenizer_round_trip(tmp_path, template_in_config):
    raw = _build_folder(tmp_path, template_in_config=template_in_config)
    tok = pm.load_tokenizer(str(tmp_path))
    assert tok.vocab_size == raw.get_vocab_size() == 300
    assert tok.bos_id == raw.token_to_id("<s>")
    assert tok.eos_id == raw.token_to_id("<|im_end|>")
    assert tok.pad_id == raw.token_to_id("<pad>")
    text = "the lazy fox said héllo"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode(text, add_special_tokens=True) == [tok.bos_id] + ids
    rendered = tok.apply_chat_template(MESSAGES[:2], add_generation_prompt=True)
    assert rendered == (
        "<s><|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tok.encode(rendered)
    assert ids[0] == tok.bos_id and ids.count(raw.token_to_id("<|im_start|>")) == 3
    assert tok.decode(ids) == rendered


def test_chat_template_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    _build_folder(tmp_path)
    ref = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(tmp_path / "tokenizer.json"), bos_token="<s>", eos_token="<|im_end|>"
    )
    ref.chat_template = CHATML
    tok = pm.load_tokenizer(str(tmp_path))
    for gen in (False, True):
        expected = ref.apply_chat_template(MESSAGES, add_generation_prompt=gen, tokenize=False)
        assert tok.apply_chat_template(MESSAGES, add_generation_prompt=gen) == expected


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        pm.load_tokenizer(str(tmp_path))
    _build_folder(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<nope>"}))
    with pytest.raises(ValueError, match="bos_token '<nope>'"):
        pm.load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    tok = pm.load_tokenizer(str(tmp_path))
    assert tok.pad_id == tok.eos_id  # no pad token: EOS pads
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template(MESSAGES)
