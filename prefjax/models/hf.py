"""Hugging Face checkpoints: import from and export to a local folder (never the network).

Supported families (``config.json`` ``model_type``): ``llama``, ``mistral``, ``qwen2`` and
``gpt2``. A folder holds ``config.json`` and either ``model.safetensors`` or a sharded
``model.safetensors.index.json`` with its shards. Heads:

* ``head="lm"`` reads ``lm_head.weight`` (or ties it to the embedding);
* ``head="reward"`` reads ``score.weight`` of a ``*ForSequenceClassification`` checkpoint with one
  label, or -- from a policy checkpoint -- keeps the trunk and initialises a new reward head;
* ``head="value"`` keeps the trunk and initialises a value head.

Layout conversions: PyTorch ``nn.Linear`` weights are ``[out, in]`` and become ``[in, out]``
kernels, split per head (``q_proj.weight [H*Dh, D]`` -> ``[D, H, Dh]``); GPT-2's ``Conv1D`` weights
are already ``[in, out]`` and its fused ``c_attn`` is split into q, k, v. Per-layer tensors are
stacked on a leading ``layers`` axis (prefjax scans over layers). Export inverts every step, so
``save_pretrained(from_pretrained(p))`` reproduces the tensors of ``p``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from einops import EinopsError, rearrange
from safetensors import safe_open
from safetensors.flax import save_file

from prefjax.models.config import RopeScaling, TransformerConfig
from prefjax.models.model import Model, _init_fn, _init_head_params

SUPPORTED = ("llama", "mistral", "qwen2", "gpt2")
_ARCH_PREFIX = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "gpt2": "GPT2"}

_HF_ACT = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
}


# ------------------------------------------------------------------------------------------------
# config.json <-> TransformerConfig


def _rope_from_hf(hf: dict, where: str) -> tuple[float, RopeScaling | None]:
    """Rope base and scaling from either the transformers 5 ``rope_parameters`` or the older
    ``rope_theta`` + ``rope_scaling`` fields."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and "rope_type" not in params and "rope_theta" not in params:
        raise ValueError(f"{where}: per-layer-type rope_parameters are not supported: {params}")
    if not params:
        params = dict(hf.get("rope_scaling") or {})
        params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type == "llama3":
        return theta, RopeScaling(
            rope_type="llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    if rope_type == "linear":
        return theta, RopeScaling(rope_type="linear", factor=float(params["factor"]))
    raise ValueError(
        f"{where}: rope type {rope_type!r} is not supported (supported: default, llama3, linear)"
    )


def _first_id(value):
    if isinstance(value, list):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def config_from_hf(hf: dict, *, where: str = "config.json", **overrides) -> TransformerConfig:
    """A :class:`TransformerConfig` from a Hugging Face ``config.json`` dict.

    Raises:
      ValueError: naming ``where`` and the field, for an unsupported family or option.
    """
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED:
        raise ValueError(
            f"{where}: model_type {model_type!r} (architectures {hf.get('architectures')}) is not "
            f"supported; supported families: {SUPPORTED}"
        )
    ids = dict(
        bos_token_id=_first_id(hf.get("bos_token_id")),
        eos_token_id=_first_id(hf.get("eos_token_id")),
        pad_token_id=_first_id(hf.get("pad_token_id")),
    )
    if model_type == "gpt2":
        if hf.get("scale_attn_by_inverse_layer_idx"):
            raise ValueError(f"{where}: scale_attn_by_inverse_layer_idx=true is not supported")
        if hf.get("scale_attn_weights", True) is False:
            raise ValueError(f"{where}: scale_attn_weights=false is not supported")
        if hf.get("add_cross_attention"):
            raise ValueError(f"{where}: add_cross_attention=true is not supported")
        act = hf.get("activation_function", "gelu_new")
        if act not in _HF_ACT:
            raise ValueError(f"{where}: activation_function {act!r} is not supported")
        d = int(hf["n_embd"])
        fields = dict(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=d,
            num_layers=int(hf["n_layer"]),
            num_heads=int(hf["n_head"]),
            num_kv_heads=int(hf["n_head"]),
            mlp_dim=int(hf.get("n_inner") or 4 * d),
            max_positions=int(hf.get("n_positions", 1024)),
            norm="layer",
            norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
            position="learned",
            qkv_bias=True,
            out_bias=True,
            mlp_bias=True,
            gated_mlp=False,
            activation=_HF_ACT[act],
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
            model_type="gpt2",
            **ids,
        )
        return TransformerConfig(**{**fields, **overrides})

    act = hf.get("hidden_act", "silu")
    if act not in _HF_ACT:
        raise ValueError(f"{where}: hidden_act {act!r} is not supported")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{where}: partial_rotary_factor != 1 is not supported")
    theta, scaling = _rope_from_hf(hf, where)
    heads = int(hf["num_attention_heads"])
    attention_bias = bool(hf.get("attention_bias", False))
    qkv_bias, out_bias = attention_bias, attention_bias
    if model_type == "qwen2":
        qkv_bias, out_bias = True, False
    elif model_type == "mistral":
        qkv_bias, out_bias = False, False
    sliding_window, layer_types = _sliding_from_hf(hf, model_type, where)
    fields = dict(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        mlp_dim=int(hf["intermediate_size"]),
        head_dim=int(hf["head_dim"]) if hf.get("head_dim") else None,
        max_positions=int(hf.get("max_position_embeddings", 2048)),
        norm="rms",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        position="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        qkv_bias=qkv_bias,
        out_bias=out_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)) if model_type == "llama" else False,
        gated_mlp=True,
        activation=_HF_ACT[act],
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        sliding_window=sliding_window,
        sliding_window_layers=layer_types,
        model_type=model_type,
        **ids,
    )
    return TransformerConfig(**{**fields, **overrides})


def _sliding_from_hf(hf, model_type, where):
    """Sliding window size and, when it applies to only some layers, which ones."""
    window = hf.get("sliding_window")
    if model_type == "llama" or window is None:
        return None, None
    num_layers = int(hf["num_hidden_layers"])
    if model_type == "mistral":
        return int(window), None
    # Qwen2: only with use_sliding_window, and only on layers from max_window_layers on (or as
    # listed in layer_types).
    types = hf.get("layer_types")
    if types is None:
        if not hf.get("use_sliding_window", False):
            return None, None
        first = int(hf.get("max_window_layers", num_layers))
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
    unknown = set(types) - {"sliding_attention", "full_attention"}
    if unknown:
        raise ValueError(f"{where}: unsupported layer_types {sorted(unknown)}")
    sliding = tuple(t == "sliding_attention" for t in types)
    if not any(sliding):
        return None, None
    if all(sliding):
        return int(window), None
    return int(window), sliding


def _hf_act_name(config: TransformerConfig) -> str:
    if config.activation == "gelu_tanh":
        return "gelu_new" if config.model_type == "gpt2" else "gelu_pytorch_tanh"
    return config.activation


def config_to_hf(config: TransformerConfig, *, head: str = "lm", dtype: Any = None) -> dict:
    """The Hugging Face ``config.json`` dict of ``config``.

    Raises:
      ValueError: naming the field when ``config`` cannot be expressed in its ``model_type``.
    """
    mt = config.model_type
    if mt not in SUPPORTED:
        raise ValueError(f"TransformerConfig.model_type={mt!r}: export supports {SUPPORTED}")

    def need(ok, field, msg):
        if not ok:
            raise ValueError(
                f"TransformerConfig.{field}={getattr(config, field)!r} cannot be exported as "
                f"model_type {mt!r}: {msg}"
            )

    if head == "value":
        raise ValueError(
            "value heads have no transformers class; export the trunk with an LM head instead"
        )
    suffix = "ForCausalLM" if mt != "gpt2" else "LMHeadModel"
    if head == "reward":
        suffix = "ForSequenceClassification"
    out: dict[str, Any] = {"architectures": [_ARCH_PREFIX[mt] + suffix], "model_type": mt}
    dtype_name = jnp.dtype(dtype or config.param_dtype).name
    if mt == "gpt2":
        need(config.norm == "layer", "norm", "GPT-2 uses LayerNorm")
        need(config.position == "learned", "position", "GPT-2 uses learned positions")
        need(not config.gated_mlp, "gated_mlp", "GPT-2 has a plain MLP")
        need(config.qkv_bias and config.out_bias and config.mlp_bias, "qkv_bias", "needs biases")
        need(config.num_kv_heads == config.num_heads, "num_kv_heads", "GPT-2 has no GQA")
        need(
            config.resolved_head_dim * config.num_heads == config.hidden_size,
            "head_dim",
            "GPT-2 needs head_dim * num_heads == hidden_size",
        )
        need(config.sliding_window is None, "sliding_window", "GPT-2 has no sliding window")
        out.update(
            vocab_size=config.vocab_size,
            n_embd=config.hidden_size,
            n_layer=config.num_layers,
            n_head=config.num_heads,
            n_inner=config.mlp_dim,
            n_positions=config.max_positions,
            activation_function=_hf_act_name(config),
            layer_norm_epsilon=config.norm_eps,
            tie_word_embeddings=config.tie_embeddings,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    else:
        need(config.norm == "rms", "norm", "needs RMSNorm")
        need(config.position == "rope", "position", "needs rotary positions")
        need(config.gated_mlp, "gated_mlp", "needs a gated MLP")
        if mt == "llama":
            need(config.qkv_bias == config.out_bias, "qkv_bias", "Llama biases q/k/v/o together")
            need(config.sliding_window is None, "sliding_window", "Llama has no sliding window")
        if mt == "mistral":
            need(not (config.qkv_bias or config.out_bias), "qkv_bias", "Mistral has no biases")
            need(not config.mlp_bias, "mlp_bias", "Mistral has no MLP bias")
            need(config.sliding_window_layers is None, "sliding_window_layers", "all or none")
        if mt == "qwen2":
            need(config.qkv_bias, "qkv_bias", "Qwen2 always has q/k/v biases")
            need(not config.out_bias, "out_bias", "Qwen2 has no o_proj bias")
            need(not config.mlp_bias, "mlp_bias", "Qwen2 has no MLP bias")
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
        if config.rope_scaling is not None:
            s = config.rope_scaling
            rope = {"rope_type": s.rope_type, "rope_theta": config.rope_theta, "factor": s.factor}
            if s.rope_type == "llama3":
                rope.update(
                    low_freq_factor=s.low_freq_factor,
                    high_freq_factor=s.high_freq_factor,
                    original_max_position_embeddings=s.original_max_position_embeddings,
                )
        out.update(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.mlp_dim,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            num_key_value_heads=config.num_kv_heads,
            head_dim=config.resolved_head_dim,
            hidden_act=_hf_act_name(config),
            max_position_embeddings=config.max_positions,
            rms_norm_eps=config.norm_eps,
            rope_parameters=rope,
            tie_word_embeddings=config.tie_embeddings,
            attention_dropout=0.0,
        )
        if mt == "llama":
            out.update(attention_bias=config.qkv_bias, mlp_bias=config.mlp_bias)
        if mt in ("mistral", "qwen2"):
            out["sliding_window"] = config.sliding_window
        if mt == "qwen2":
            layers = config.sliding_window_layers
            if config.sliding_window is not None and layers is None:
                layers = (True,) * config.num_layers
            if layers is None:
                out["use_sliding_window"] = False
            else:
                out["use_sliding_window"] = True
                out["layer_types"] = [
                    "sliding_attention" if s else "full_attention" for s in layers
                ]
                first = next((i for i, s in enumerate(layers) if s), config.num_layers)
                out["max_window_layers"] = first
    if head == "reward":
        out["num_labels"] = 1
        out["id2label"] = {"0": "LABEL_0"}
        out["label2id"] = {"LABEL_0": 0}
    out.update(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        dtype=dtype_name,
        use_cache=True,
    )
    return out


# ------------------------------------------------------------------------------------------------
# Tensor name mappings. A family maps one layer's parameters (dict of numpy arrays, no layers
# axis) to and from Hugging Face tensors named relative to the layer prefix. Layout changes are
# einops patterns over the axis names of transformer.py: ``d`` hidden (D), ``h`` query heads (H),
# ``k`` key/value heads (K), ``n`` either, ``hd`` head size (Dh), ``qkv`` GPT-2's fused q | k | v.
# PyTorch ``nn.Linear`` weights are ``[out, in]``: ``q_proj.weight`` is ``(h hd) d``.

_QKV = ("q_proj", "k_proj", "v_proj")


def _llama_layer_in(get: Callable[[str], np.ndarray], cfg: TransformerConfig) -> dict:
    h, k, hd = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
    w = lambda name: get(f"self_attn.{name}.weight")  # noqa: E731
    attn = {
        "q_proj": {"kernel": rearrange(w("q_proj"), "(h hd) d -> d h hd", h=h, hd=hd)},
        "k_proj": {"kernel": rearrange(w("k_proj"), "(k hd) d -> d k hd", k=k, hd=hd)},
        "v_proj": {"kernel": rearrange(w("v_proj"), "(k hd) d -> d k hd", k=k, hd=hd)},
        "o_proj": {"kernel": rearrange(w("o_proj"), "d (h hd) -> h hd d", h=h, hd=hd)},
    }
    if cfg.qkv_bias:
        b = lambda name: get(f"self_attn.{name}.bias")  # noqa: E731
        attn["q_proj"]["bias"] = rearrange(b("q_proj"), "(h hd) -> h hd", h=h, hd=hd)
        attn["k_proj"]["bias"] = rearrange(b("k_proj"), "(k hd) -> k hd", k=k, hd=hd)
        attn["v_proj"]["bias"] = rearrange(b("v_proj"), "(k hd) -> k hd", k=k, hd=hd)
    if cfg.out_bias:
        attn["o_proj"]["bias"] = get("self_attn.o_proj.bias")
    mlp = {name: {"kernel": get(f"mlp.{name}.weight").T} for name in ("gate_proj", "up_proj")}
    mlp["down_proj"] = {"kernel": get("mlp.down_proj.weight").T}
    if cfg.mlp_bias:
        for name in ("gate_proj", "up_proj", "down_proj"):
            mlp[name]["bias"] = get(f"mlp.{name}.bias")
    return {
        "attn_norm": {"scale": get("input_layernorm.weight")},
        "attn": attn,
        "mlp_norm": {"scale": get("post_attention_layernorm.weight")},
        "mlp": mlp,
    }


def _llama_layer_out(p: dict, cfg: TransformerConfig) -> dict:
    attn, mlp = p["attn"], p["mlp"]
    out = {
        "input_layernorm.weight": p["attn_norm"]["scale"],
        "post_attention_layernorm.weight": p["mlp_norm"]["scale"],
        "self_attn.o_proj.weight": rearrange(attn["o_proj"]["kernel"], "h hd d -> d (h hd)"),
    }
    for name in ("q_proj", "k_proj", "v_proj"):
        out[f"self_attn.{name}.weight"] = rearrange(attn[name]["kernel"], "d n hd -> (n hd) d")
        if cfg.qkv_bias:
            out[f"self_attn.{name}.bias"] = rearrange(attn[name]["bias"], "n hd -> (n hd)")
    if cfg.out_bias:
        out["self_attn.o_proj.bias"] = attn["o_proj"]["bias"]
    for name in ("gate_proj", "up_proj", "down_proj"):
        out[f"mlp.{name}.weight"] = mlp[name]["kernel"].T
        if cfg.mlp_bias:
            out[f"mlp.{name}.bias"] = mlp[name]["bias"]
    return out


def _gpt2_layer_in(get, cfg: TransformerConfig) -> dict:
    h, hd = cfg.num_heads, cfg.resolved_head_dim
    # Conv1D stores [in, out]; c_attn's output is [q | k | v] along the last axis.
    w = rearrange(get("attn.c_attn.weight"), "d (qkv h hd) -> qkv d h hd", qkv=3, h=h, hd=hd)
    b = rearrange(get("attn.c_attn.bias"), "(qkv h hd) -> qkv h hd", qkv=3, h=h, hd=hd)
    attn = {name: {"kernel": w[i], "bias": b[i]} for i, name in enumerate(_QKV)}
    attn["o_proj"] = {
        "kernel": rearrange(get("attn.c_proj.weight"), "(h hd) d -> h hd d", h=h, hd=hd),
        "bias": get("attn.c_proj.bias"),
    }
    return {
        "attn_norm": {"scale": get("ln_1.weight"), "bias": get("ln_1.bias")},
        "attn": attn,
        "mlp_norm": {"scale": get("ln_2.weight"), "bias": get("ln_2.bias")},
        "mlp": {
            "up_proj": {"kernel": get("mlp.c_fc.weight"), "bias": get("mlp.c_fc.bias")},
            "down_proj": {"kernel": get("mlp.c_proj.weight"), "bias": get("mlp.c_proj.bias")},
        },
    }


def _gpt2_layer_out(p: dict, cfg: TransformerConfig) -> dict:
    attn, mlp = p["attn"], p["mlp"]
    # A list of arrays is stacked on a new first axis (here ``qkv``) by einops.
    qkv_w = rearrange([attn[n]["kernel"] for n in _QKV], "qkv d h hd -> d (qkv h hd)")
    qkv_b = rearrange([attn[n]["bias"] for n in _QKV], "qkv h hd -> (qkv h hd)")
    return {
        "ln_1.weight": p["attn_norm"]["scale"],
        "ln_1.bias": p["attn_norm"]["bias"],
        "attn.c_attn.weight": qkv_w,
        "attn.c_attn.bias": qkv_b,
        "attn.c_proj.weight": rearrange(attn["o_proj"]["kernel"], "h hd d -> (h hd) d"),
        "attn.c_proj.bias": attn["o_proj"]["bias"],
        "ln_2.weight": p["mlp_norm"]["scale"],
        "ln_2.bias": p["mlp_norm"]["bias"],
        "mlp.c_fc.weight": mlp["up_proj"]["kernel"],
        "mlp.c_fc.bias": mlp["up_proj"]["bias"],
        "mlp.c_proj.weight": mlp["down_proj"]["kernel"],
        "mlp.c_proj.bias": mlp["down_proj"]["bias"],
    }


def _names(cfg: TransformerConfig) -> dict:
    """Prefixes and top-level tensor names of a family (as written by ``*ForCausalLM``)."""
    if cfg.model_type == "gpt2":
        return dict(
            trunk="transformer.",
            layer="h.{i}.",
            embed="wte.weight",
            pos="wpe.weight",
            norm=("ln_f.weight", "ln_f.bias"),
            layer_in=_gpt2_layer_in,
            layer_out=_gpt2_layer_out,
        )
    return dict(
        trunk="model.",
        layer="layers.{i}.",
        embed="embed_tokens.weight",
        pos=None,
        norm=("norm.weight", None),
        layer_in=_llama_layer_in,
        layer_out=_llama_layer_out,
    )


# Buffers some checkpoints carry that hold no parameters.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "attn.bias", "attn.masked_bias")


# ------------------------------------------------------------------------------------------------
# Reading.


class _TensorSource:
    """Tensor names -> files of a local folder; reads lazily, tracks what was used."""

    def __init__(self, path: str):
        self.path = path
        single = os.path.join(path, "model.safetensors")
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(single):
            with safe_open(single, framework="flax") as f:
                self.files = {name: single for name in f.keys()}
            self.where = single
        elif os.path.isfile(index):
            with open(index) as fh:
                weight_map = json.load(fh).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: no 'weight_map' object")
            self.files = {name: os.path.join(path, f) for name, f in weight_map.items()}
            for f in set(self.files.values()):
                if not os.path.isfile(f):
                    raise FileNotFoundError(f"{index} lists shard {f!r}, which does not exist")
            self.where = index
        else:
            bins = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth"))]
            hint = f" (found {bins}: PyTorch pickles are not read; convert to safetensors)"
            raise FileNotFoundError(
                f"{path!r} has neither model.safetensors nor model.safetensors.index.json"
                + (hint if bins else "")
            )
        self.used: set[str] = set()
        self._handles: dict[str, Any] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> np.ndarray:
        """The tensor as a float32 NumPy array (bfloat16 / float16 checkpoints are upcast)."""
        if name not in self.files:
            raise KeyError(f"tensor {name!r} is missing from {self.where}")
        file = self.files[name]
        if file not in self._handles:
            self._handles[file] = safe_open(file, framework="flax")
        try:
            x = self._handles[file].get_tensor(name)
        except Exception as e:  # a corrupt or truncated file
            raise ValueError(f"cannot read tensor {name!r} from {file}: {e}") from e
        self.used.add(name)
        return np.asarray(jnp.asarray(x, jnp.float32))

    def close(self):
        self._handles.clear()


def _read_params(src: _TensorSource, cfg: TransformerConfig, head: str) -> dict:
    names = _names(cfg)
    trunk = names["trunk"]
    # Checkpoints of the bare trunk (e.g. GPT2Model, LlamaModel) carry no prefix.
    if not any(n.startswith(trunk) for n in src.files):
        trunk = ""

    def top(name):
        return src.get(trunk + name)

    layers = []
    for i in range(cfg.num_layers):
        prefix = trunk + names["layer"].format(i=i)
        try:
            layers.append(names["layer_in"](lambda n, p=prefix: src.get(p + n), cfg))
        except EinopsError as e:  # a head split that does not fit config.json
            raise ValueError(
                f"{src.where}: a tensor under {prefix!r} does not fit config.json: {e}"
            ) from e
    params = {
        "embed": {"embedding": top(names["embed"])},
        # [L] x per-layer tree -> one tree with a leading layers axis.
        "layers": jax.tree.map(lambda *xs: np.stack(xs), *layers),
        "final_norm": {"scale": top(names["norm"][0])},
    }
    if names["norm"][1]:
        params["final_norm"]["bias"] = top(names["norm"][1])
    if names["pos"]:
        params["pos_embed"] = {"embedding": top(names["pos"])}
    if head == "lm" and not cfg.tie_embeddings:
        params["lm_head"] = {"kernel": src.get("lm_head.weight").T}
    if head == "reward" and "score.weight" in src:
        w = src.get("score.weight")  # [num_labels, D]
        if w.shape[0] != 1:
            raise ValueError(
                f"tensor 'score.weight' in {src.files['score.weight']} has {w.shape[0]} labels; a "
                "reward head needs exactly 1"
            )
        params["reward_head"] = {"kernel": w.T}
    return params


def _check_shapes(params, expected, where: str):
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    exp = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
    for path, x in flat:
        want = exp.get(path)
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if want is None:
            raise ValueError(f"{where}: unexpected parameter {name}")
        if tuple(x.shape) != tuple(want.shape):
            raise ValueError(
                f"{where}: parameter {name} has shape {tuple(x.shape)}, config.json implies "
                f"{tuple(want.shape)}"
            )


def read_hf_config(path: str) -> dict:
    """The ``config.json`` dict of a local folder."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no config.json in {path!r}")
    with open(file) as f:
        return json.load(f)


def from_pretrained(
    path: str,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    head: str = "lm",
    key: jax.Array | None = None,
    **overrides,
) -> Model:
    """Load a local Hugging Face folder (Llama, Mistral, Qwen2 or GPT-2) as a :class:`Model`.

    Args:
      path: folder with ``config.json`` and ``model.safetensors`` (or a sharded index).
      dtype: compute dtype (e.g. ``jnp.bfloat16``).
      param_dtype: dtype the parameters are stored in.
      head: ``"lm"``, ``"reward"`` or ``"value"``. A reward head is read from ``score.weight`` when
        the checkpoint has one (a ``*ForSequenceClassification`` with one label); otherwise the
        head is initialised from ``key`` on top of the loaded trunk (a reward or value model
        initialised from a policy).
      key: PRNG key for a newly initialised head (default ``jax.random.key(0)``).
      **overrides: further :class:`TransformerConfig` fields, e.g. ``remat="dots"``,
        ``attention_impl="cudnn"``.

    Returns:
      The model; ``model.params`` holds the checkpoint's weights.

    Raises:
      FileNotFoundError / KeyError / ValueError: naming the file and the tensor or field.
    """
    hf = read_hf_config(path)
    where = os.path.join(path, "config.json")
    config = config_from_hf(hf, where=where, dtype=dtype, param_dtype=param_dtype, **overrides)
    src = _TensorSource(path)
    try:
        # Read and convert on the host, whatever the default device; only the final parameters
        # (below) go to the default device.
        with jax.default_device(jax.devices("cpu")[0]):
            params = _read_params(src, config, head)
    finally:
        src.close()
    unused = [
        n
        for n in src.files
        if n not in src.used
        and not n.endswith(_IGNORED_SUFFIXES)
        and not (n == "lm_head.weight" and (config.tie_embeddings or head != "lm"))
        and not (n == "score.weight" and head != "reward")
    ]
    if unused:
        raise ValueError(
            f"{src.where}: {len(unused)} tensor(s) not used by a {config.model_type} model with "
            f"head {head!r}, e.g. {sorted(unused)[:5]}"
        )
    params = jax.tree.map(lambda x: jnp.asarray(x, param_dtype), params)
    head_name = {"lm": "lm_head", "reward": "reward_head", "value": "value_head"}[head]
    if head != "lm" and head_name not in params:
        key = jax.random.key(0) if key is None else key
        params.update(_init_head_params(config, head, key))
    _check_shapes(params, jax.eval_shape(lambda: _shape_tree(config, head)), src.where)
    return Model(config, params, head=head)


def _shape_tree(config, head):
    return nn.unbox(_init_fn(config, head)(jax.random.key(0)))


# ------------------------------------------------------------------------------------------------
# Writing.


def _to_numpy_tree(params):
    return jax.tree.map(lambda x: np.asarray(jnp.asarray(x, jnp.float32)), params)


def save_pretrained(
    model_or_config: Model | TransformerConfig,
    params: Any,
    path: str,
    *,
    head: str | None = None,
    dtype: Any = None,
    max_shard_size: int = 5 * 2**30,
) -> None:
    """Write ``params`` as a Hugging Face folder that ``transformers`` loads.

    Writes ``config.json`` and ``model.safetensors`` (or shards plus
    ``model.safetensors.index.json`` when larger than ``max_shard_size`` bytes). An LM head becomes
    ``{Llama,Mistral,Qwen2}ForCausalLM`` / ``GPT2LMHeadModel``; a reward head a
    ``*ForSequenceClassification`` with one label (set ``pad_token_id`` in the config so that
    ``transformers`` finds the last token of padded batches). Merge LoRA adapters first with
    :func:`~prefjax.models.merge_lora`.

    Args:
      model_or_config: a :class:`Model` (config and head taken from it) or a config.
      params: the parameter pytree to write.
      path: output folder (created if missing).
      head: ``"lm"`` or ``"reward"``; default: the model's head, or inferred from ``params``.
      dtype: dtype of the written tensors (default: the config's ``param_dtype``).
      max_shard_size: shard size limit in bytes.
    """
    if isinstance(model_or_config, Model):
        config, head = model_or_config.config, head or model_or_config.head
    else:
        config = model_or_config
        if head is None:
            head = (
                "reward" if "reward_head" in params else "value" if "value_head" in params else "lm"
            )
    hf_config = config_to_hf(config, head=head, dtype=dtype)
    dtype = jnp.dtype(dtype or config.param_dtype)
    names = _names(config)
    p = _to_numpy_tree(params)
    if "layers" not in p:
        raise ValueError("params have no 'layers' entry; is this a prefjax parameter tree?")
    num_layers = jax.tree.leaves(p["layers"])[0].shape[0]
    if num_layers != config.num_layers:
        raise ValueError(
            f"params have {num_layers} layers, TransformerConfig.num_layers={config.num_layers}"
        )
    trunk = names["trunk"]
    if head == "reward" and config.model_type == "gpt2":
        trunk = "transformer."
    tensors: dict[str, np.ndarray] = {trunk + names["embed"]: p["embed"]["embedding"]}
    if names["pos"]:
        tensors[trunk + names["pos"]] = p["pos_embed"]["embedding"]
    for i in range(num_layers):
        layer = jax.tree.map(lambda x, i=i: x[i], p["layers"])
        prefix = trunk + names["layer"].format(i=i)
        for n, x in names["layer_out"](layer, config).items():
            tensors[prefix + n] = x
    tensors[trunk + names["norm"][0]] = p["final_norm"]["scale"]
    if names["norm"][1]:
        tensors[trunk + names["norm"][1]] = p["final_norm"]["bias"]
    if head == "lm" and not config.tie_embeddings:
        tensors["lm_head.weight"] = p["lm_head"]["kernel"].T
    if head == "reward":
        tensors["score.weight"] = p["reward_head"]["kernel"].T
    os.makedirs(path, exist_ok=True)
    out = {n: jnp.asarray(np.ascontiguousarray(x), dtype) for n, x in tensors.items()}
    _write_shards(out, path, max_shard_size, save_file)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        gen = {
            k: hf_config[k]
            for k in ("bos_token_id", "eos_token_id", "pad_token_id")
            if hf_config.get(k) is not None
        }
        json.dump(gen, f, indent=2)


def _write_shards(tensors: dict, path: str, max_shard_size: int, save_file):
    shards: list[dict] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    meta = {"format": "pt"}
    for stale in ("model.safetensors", "model.safetensors.index.json"):
        if os.path.exists(os.path.join(path, stale)):
            os.remove(os.path.join(path, stale))
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, "model.safetensors"), metadata=meta)
        return
    weight_map = {}
    total = 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, fname), metadata=meta)
        for name, x in shard.items():
            weight_map[name] = fname
            total += x.nbytes
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
