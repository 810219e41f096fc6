"""Hugging Face checkpoints: logit parity with ``transformers`` on import and export, sharded
folders, and the errors for broken or unsupported folders.

The parity tests build tiny random ``transformers`` models from configs written here (nothing is
downloaded), save them with ``save_pretrained``, load them with prefjax and compare logits on a
left-padded batch; then export with prefjax, load with ``transformers`` and compare again.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import prefjax.models as pm

VOCAB = 101
TOL = 1e-4  # float32 logits, as the issue asks


def _batch():
    """[3, 10] ids with rows left-padded by 0, 3 and 6 tokens, and HF position ids."""
    rng = np.random.RandomState(0)
    ids = rng.randint(0, VOCAB, size=(3, 10)).astype(np.int64)
    mask = np.ones((3, 10), np.int64)
    mask[1, :3] = 0
    mask[2, :6] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return ids, mask, positions


def _hf_configs(transformers):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        initializer_range=0.1,
    )
    return {
        # Grouped-query attention, Llama-3 rope scaling (all three frequency bands occur with
        # head_dim 8 and original context 16), q/k/v/o and MLP biases, untied head.
        "llama": (
            transformers.LlamaForCausalLM,
            transformers.LlamaConfig(
                **common,
                num_key_value_heads=2,
                attention_bias=True,
                mlp_bias=True,
                tie_word_embeddings=False,
                rope_parameters={
                    "rope_type": "llama3",
                    "rope_theta": 500000.0,
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 16,
                },
            ),
        ),
        # Multi-head attention, q/k/v biases, tied embeddings, sliding window on layer 1 only.
        "qwen2": (
            transformers.Qwen2ForCausalLM,
            transformers.Qwen2Config(
                **common,
                num_key_value_heads=4,
                tie_word_embeddings=True,
                use_sliding_window=True,
                sliding_window=3,
                max_window_layers=1,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            ),
        ),
        # Multi-query attention, explicit head_dim != hidden / heads, sliding window everywhere.
        "mistral": (
            transformers.MistralForCausalLM,
            transformers.MistralConfig(
                **common, num_key_value_heads=1, head_dim=16, sliding_window=4
            ),
        ),
        # Learned positions, LayerNorm, fused Conv1D attention, GELU (tanh), tied head.
        "gpt2": (
            transformers.GPT2LMHeadModel,
            transformers.GPT2Config(
                vocab_size=VOCAB,
                n_embd=32,
                n_layer=2,
                n_head=4,
                n_positions=64,
                initializer_range=0.1,
                bos_token_id=0,
                eos_token_id=0,
            ),
        ),
    }


def _hf_logits(torch, model, ids, mask, positions):
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(positions),
        )
    return out.logits.float().numpy()


def _random_hf_model(torch, cls, config):
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():
        # Norm weights start at 1 and biases at 0; perturb them so their mapping is tested.
        for _, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.mark.parity
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2"])
def test_logit_parity_import_and_export(arch, tmp_path, record_property):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cls, config = _hf_configs(transformers)[arch]
    hf_model = _random_hf_model(torch, cls, config)
    src = str(tmp_path / "hf")
    hf_model.save_pretrained(src)
    ids, mask, positions = _batch()
    ref = _hf_logits(torch, hf_model, ids, mask, positions)
    real = mask == 1

    model = pm.from_pretrained(src)
    assert model.config.model_type == arch
    logits = np.asarray(jax.jit(model.apply)(model.params, ids, mask))
    import_err = np.abs(logits - ref)[real].max()
    record_property("import_max_abs_err", float(import_err))
    assert import_err < TOL, import_err
    assert np.abs(ref[real]).max() > 1.0  # logits large enough for the tolerance to mean something

    out = str(tmp_path / "export")
    pm.save_pretrained(model, model.params, out)
    reloaded = cls.from_pretrained(out).eval()
    # Export inverts import exactly: every tensor comes back bit for bit.
    original = hf_model.state_dict()
    for name, tensor in reloaded.state_dict().items():
        np.testing.assert_array_equal(tensor.numpy(), original[name].numpy(), err_msg=name)
    export_err = np.abs(_hf_logits(torch, reloaded, ids, mask, positions) - logits)[real].max()
    record_property("export_max_abs_err", float(export_err))
    assert export_err < TOL, export_err
    print(f"{arch}: import {import_err:.2e} export {export_err:.2e}")


@pytest.mark.parity
def test_sliding_window_matters_in_parity_configs(tmp_path):
    """The windows of the parity configs are short enough to change the logits (so the parity
    tests above check the window logic rather than pass without it)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cls, config = _hf_configs(transformers)["mistral"]
    _random_hf_model(torch, cls, config).save_pretrained(str(tmp_path))
    ids, mask, _ = _batch()
    windowed = pm.from_pretrained(str(tmp_path))
    full = pm.from_pretrained(str(tmp_path), sliding_window=None)
    diff = np.abs(
        np.asarray(windowed.apply(windowed.params, ids, mask))
        - np.asarray(full.apply(full.params, ids, mask))
    )
    assert diff[0, -1].max() > 1e-3


@pytest.mark.parity
def test_reward_model_round_trip_with_sequence_classification(tmp_path):
    """A reward head exports as ``LlamaForSequenceClassification`` (one label) and back."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    _, config = _hf_configs(transformers)["llama"]
    config.pad_token_id = 0
    policy = _random_hf_model(torch, transformers.LlamaForCausalLM, config)
    policy.save_pretrained(str(tmp_path / "policy"))
    # A reward model initialised from the policy checkpoint: trunk loaded, head new.
    reward = pm.from_pretrained(str(tmp_path / "policy"), head="reward", key=jax.random.key(1))
    assert reward.params["reward_head"]["kernel"].shape == (32, 1)
    pm.save_pretrained(reward, reward.params, str(tmp_path / "rm"))
    hf_rm = transformers.LlamaForSequenceClassification.from_pretrained(str(tmp_path / "rm"))
    ids, mask, positions = _batch()
    ids = np.where(mask == 1, np.maximum(ids, 1), 0)  # id 0 is the pad token
    with torch.no_grad():
        scores = hf_rm.eval()(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(positions),
        ).logits[:, 0]
    ours = np.asarray(reward.apply(reward.params, ids, mask))
    np.testing.assert_allclose(ours, scores.numpy(), atol=TOL)
    again = pm.from_pretrained(str(tmp_path / "rm"), head="reward")
    np.testing.assert_array_equal(
        again.params["reward_head"]["kernel"], reward.params["reward_head"]["kernel"]
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny):
    """The tiny preset written as a Hugging Face folder (no torch needed)."""
    path = str(tmp_path_factory.mktemp("tiny_hf"))
    pm.save_pretrained(tiny, tiny.params, path)
    return path


def test_round_trip_without_transformers(exported, tiny):
    with open(os.path.join(exported, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["num_key_value_heads"] == 2 and cfg["head_dim"] == 16
    loaded = pm.from_pretrained(exported, init_std=tiny.config.init_std)
    assert loaded.config == tiny.config.replace(head_dim=16)  # written explicitly
    jax.tree.map(np.testing.assert_array_equal, loaded.params, tiny.params)


def test_sharded_checkpoint(tmp_path, tiny):
    pm.save_pretrained(tiny, tiny.params, str(tmp_path), max_shard_size=40_000)
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    loaded = pm.from_pretrained(str(tmp_path))
    jax.tree.map(np.testing.assert_array_equal, loaded.params, tiny.params)


def test_bfloat16_params_and_compute(exported, tiny):
    model = pm.from_pretrained(exported, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(model.params))
    assert model.config.dtype == jnp.bfloat16


def _rewrite_tensors(src, dst, edit):
    from safetensors.numpy import load_file, save_file

    os.makedirs(dst, exist_ok=True)
    tensors = edit(load_file(os.path.join(src, "model.safetensors")))
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    return cfg


def test_missing_tensor_names_tensor_and_file(exported, tmp_path):
    name = "model.layers.1.self_attn.k_proj.weight"
    cfg = _rewrite_tensors(
        exported, str(tmp_path), lambda t: {k: v for k, v in t.items() if k != name}
    )
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    with pytest.raises(KeyError, match=rf"{name}.*model\.safetensors"):
        pm.from_pretrained(str(tmp_path))


def test_unexpected_tensor_is_an_error(exported, tmp_path):
    cfg = _rewrite_tensors(
        exported, str(tmp_path), lambda t: {**t, "model.extra.weight": np.zeros(3, np.float32)}
    )
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    with pytest.raises(ValueError, match="model.extra.weight"):
        pm.from_pretrained(str(tmp_path))


def test_wrong_shape_names_parameter(exported, tmp_path):
    cfg = _rewrite_tensors(exported, str(tmp_path), lambda t: t)
    cfg["intermediate_size"] = 96  # the tensors hold 128
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    with pytest.raises((ValueError, KeyError), match="mlp"):
        pm.from_pretrained(str(tmp_path))


def test_unsupported_architecture(exported, tmp_path):
    cfg = _rewrite_tensors(exported, str(tmp_path), lambda t: t)
    cfg["model_type"], cfg["architectures"] = "gemma", ["GemmaForCausalLM"]
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    with pytest.raises(ValueError, match=r"config\.json.*'gemma'"):
        pm.from_pretrained(str(tmp_path))


def test_missing_files(tmp_path, exported):
    with pytest.raises(FileNotFoundError, match="config.json"):
        pm.from_pretrained(str(tmp_path))
    json.dump(
        json.load(open(os.path.join(exported, "config.json"))), open(tmp_path / "config.json", "w")
    )
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        pm.from_pretrained(str(tmp_path))


def test_export_refuses_unrepresentable_configs(tiny, tmp_path):
    bad = tiny.config.replace(qkv_bias=True)  # Llama biases q/k/v/o together
    with pytest.raises(ValueError, match="qkv_bias"):
        pm.save_pretrained(bad, tiny.params, str(tmp_path))
    with pytest.raises(ValueError, match="value heads"):
        pm.save_pretrained(tiny.with_head("value"), tiny.with_head("value").params, str(tmp_path))


def test_config_from_hf_reads_legacy_rope_fields():
    hf = dict(
        model_type="llama",
        vocab_size=10,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    cfg = pm.config_from_hf(hf)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling.factor == 32.0
    assert cfg.num_kv_heads == 2
    with pytest.raises(ValueError, match="rope type 'yarn'"):
        pm.config_from_hf({**hf, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})


@pytest.mark.parity
def test_rope_frequencies_match_transformers():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from prefjax.models.transformer import rope_inv_freq

    hf_cfg = transformers.LlamaConfig(
        hidden_size=2048,
        num_attention_heads=32,
        max_position_embeddings=131072,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    ours = rope_inv_freq(pm.preset("llama1b"))
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-6)
