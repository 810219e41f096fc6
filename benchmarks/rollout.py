r"""Decode speed: ``prefjax.models.generate`` against Hugging Face ``generate`` on the same weights.

Command (CPU; the defaults are the issue's setting)::

    python benchmarks/rollout.py            # batches 1, 8, 32, 64; cache lengths 128 .. 2048
    python benchmarks/rollout.py --quick    # batches 1, 8; a short sweep; one repeat

A Llama-shaped model (hidden 256, 4 layers, 8 query / 4 key-value heads, MLP 688, vocabulary
32000, untied embeddings, float32) is initialised by prefjax, written with
``prefjax.models.save_pretrained`` and loaded by ``transformers.LlamaForCausalLM`` (torch eager,
``sdpa`` attention), so both decode with the same weights. Every greedy token of both is compared
(the run fails on the first difference). Prompts are ``--prompt_len`` random tokens, greedy, no
EOS, so every row generates exactly ``--new_tokens`` tokens.

Reported, each a median of ``--repeats`` interleaved repeats (prefjax, HF, prefjax, HF, ...) after a
warm-up call (prefjax's compilation):

* **tokens/s** = ``batch * new_tokens / wall time`` of the whole ``generate`` call (prefill
  included, as a sampler pays it), per batch, and the ratio prefjax / HF;
* **cache-length sweep**: the same at ``--sweep_batch`` for cache lengths ``prompt + new`` in
  ``--cache_lengths`` (new tokens = length - prompt);
* **decode step at 256 vs 2048 slots**: the jitted, cache-donating ``Model.decode_step`` at
  ``--step_batch`` rows with the same tokens held (a ``--prompt_len`` prefill, then
  ``--step_tokens`` timed steps), in caches allocated for 256 and 2048 slots; and the step's
  ``bytes accessed`` from the compiled cost analysis.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from absl import app, flags

import prefjax.models as pm
from benchmarks import host

flags.DEFINE_list("batches", ["1", "8", "32", "64"], "Batch sizes of the main table.")
flags.DEFINE_integer("prompt_len", 64, "Prompt tokens per row.")
flags.DEFINE_integer("new_tokens", 128, "New tokens per row in the main table.")
flags.DEFINE_list("cache_lengths", ["128", "256", "512", "1024", "2048"], "Sweep: prompt + new.")
flags.DEFINE_integer("sweep_batch", 8, "Batch of the cache-length sweep.")
flags.DEFINE_integer(
    "step_batch", 32, "Batch of the per-step 256 vs 2048 slots comparison (0 = skip it)."
)
flags.DEFINE_integer("step_tokens", 32, "Timed decode steps per repeat in that comparison.")
flags.DEFINE_integer("repeats", 3, "Interleaved timed repeats.")
flags.DEFINE_float("init_std", 0.1, "Weight scale (peaked logits, so greedy ties do not occur).")
flags.DEFINE_integer(
    "threads", 0, "Threads for both torch and XLA's CPU runtime (0 = their defaults, all cores)."
)
flags.DEFINE_bool("quick", False, "Batches 1 and 8, cache lengths 128 and 512, one repeat.")
flags.DEFINE_string("json_out", "", "Write the results as JSON here (default: $OUT/rollout.json).")
FLAGS = flags.FLAGS


def llama_config() -> pm.TransformerConfig:
    """The Llama-shaped benchmark model."""
    return pm.TransformerConfig(
        vocab_size=32000,
        hidden_size=256,
        num_layers=4,
        num_heads=8,
        num_kv_heads=4,
        mlp_dim=688,
        max_positions=4096,
        init_std=FLAGS.init_std,
        tie_embeddings=False,
        model_type="llama",
    )


def hf_model(model: pm.Model) -> transformers.PreTrainedModel:
    """The same weights as a ``LlamaForCausalLM`` (float32, sdpa attention, eval mode)."""
    with tempfile.TemporaryDirectory() as path:
        pm.save_pretrained(model, model.params, path)
        hf = transformers.LlamaForCausalLM.from_pretrained(
            path, torch_dtype=torch.float32, attn_implementation="sdpa"
        )
    return hf.eval()


def prompts(batch: int, length: int, vocab: int, seed: int) -> np.ndarray:
    """``[batch, length]`` random token ids (no padding)."""
    return np.random.default_rng(seed).integers(1, vocab, size=(batch, length), dtype=np.int32)


def prefjax_runner(model: pm.Model, ids: np.ndarray, new: int):
    """A call generating ``new`` greedy tokens with prefjax; returns the tokens ``[B, new]``."""
    ids_j = jnp.asarray(ids)
    mask = jnp.ones_like(ids_j)

    def run():
        # Tokens only, as HF's greedy generate returns them (no per-token log-probs).
        out = pm.greedy_generate(
            model, model.params, ids_j, mask, max_new_tokens=new, logprobs=False
        )
        return np.asarray(jax.block_until_ready(out.tokens))

    return run


def hf_runner(hf, ids: np.ndarray, new: int):
    """The same with ``transformers``' ``generate``; returns the tokens ``[B, new]``."""
    ids_t = torch.from_numpy(ids.astype(np.int64))
    mask = torch.ones_like(ids_t)

    def run():
        with torch.inference_mode():
            out = hf.generate(
                input_ids=ids_t,
                attention_mask=mask,
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
            )
        return out[:, ids.shape[1] :].numpy()

    return run


def compare(model, hf, batch: int, new: int, seed: int) -> dict:
    """Tokens/s of both on one shape (interleaved medians), after checking every token."""
    ids = prompts(batch, FLAGS.prompt_len, model.config.vocab_size, seed)
    ways = {"prefjax": prefjax_runner(model, ids, new), "hf": hf_runner(hf, ids, new)}
    ours, theirs = ways["prefjax"](), ways["hf"]()  # warm-up (compilation)
    if not np.array_equal(ours, theirs):
        row, col = np.argwhere(ours != theirs)[0]
        raise AssertionError(
            f"batch {batch}: greedy tokens differ first at row {row}, step {col} "
            f"(prefjax {ours[row, col]}, HF {theirs[row, col]})"
        )
    times = {name: [] for name in ways}
    for _ in range(FLAGS.repeats):
        for name, fn in ways.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    tps = {name: batch * new / statistics.median(t) for name, t in times.items()}
    return {
        "batch": batch,
        "new_tokens": new,
        "cache_length": FLAGS.prompt_len + new,
        "prefjax_tok_s": tps["prefjax"],
        "hf_tok_s": tps["hf"],
        "ratio": tps["prefjax"] / tps["hf"],
    }


def step_times(model: pm.Model, batch: int, slots_list=(256, 2048)) -> dict:
    """Per-step time of the donated decode step with equal tokens held in caches of different
    allocations (interleaved medians), and the compiled step's bytes accessed."""
    ids = jnp.asarray(prompts(batch, FLAGS.prompt_len, model.config.vocab_size, 7))
    mask = jnp.ones_like(ids)
    prefill = jax.jit(model.prefill)
    step = jax.jit(model.decode_step, donate_argnums=(2,))
    tokens = jnp.ones((batch,), jnp.int32)

    def run(slots):
        _, cache = prefill(model.params, ids, mask, model.init_cache(batch, slots))
        logits, cache = step(model.params, tokens, cache)  # warm, outside the timing
        jax.block_until_ready(logits)
        t0 = time.perf_counter()
        for _ in range(FLAGS.step_tokens):
            logits, cache = step(model.params, tokens, cache)
        jax.block_until_ready(logits)
        return (time.perf_counter() - t0) / FLAGS.step_tokens

    result = {}
    for slots in slots_list:
        run(slots)  # compile
        cache = jax.eval_shape(lambda s=slots: model.init_cache(batch, s))
        cost = step.lower(model.params, tokens, cache).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        result[slots] = {"bytes_accessed": float(cost["bytes accessed"]), "times": []}
    for _ in range(max(FLAGS.repeats, 3)):
        for slots in slots_list:
            result[slots]["times"].append(run(slots))
    for slots in slots_list:
        result[slots]["step_ms"] = 1e3 * statistics.median(result[slots].pop("times"))
    return result


def main(argv):
    del argv
    if FLAGS.quick:
        FLAGS.batches, FLAGS.cache_lengths, FLAGS.repeats = ["1", "8"], ["128", "512"], 1
    if FLAGS.threads > 0:
        host.limit_threads(FLAGS.threads)  # before the first JAX computation starts the backend
    torch.set_num_threads(FLAGS.threads or os.cpu_count() or 1)
    model = pm.Model.init(llama_config(), jax.random.key(0))
    hf = hf_model(model)
    print(
        f"Llama-shaped: hidden 256, 4 layers, vocab 32000, float32; prompt {FLAGS.prompt_len}; "
        f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}, "
        f"transformers {transformers.__version__}; medians of {FLAGS.repeats} interleaved repeats"
    )
    results = {"batches": [], "sweep": []}
    print(f"{'batch':>6}{'new':>6}{'HF tok/s':>11}{'prefjax tok/s':>15}{'ratio':>8}")
    for b in FLAGS.batches:
        r = compare(model, hf, int(b), FLAGS.new_tokens, seed=int(b))
        results["batches"].append(r)
        print(
            f"{b:>6}{r['new_tokens']:>6}{r['hf_tok_s']:>11.0f}{r['prefjax_tok_s']:>15.0f}"
            f"{r['ratio']:>8.2f}"
        )
    print(f"cache-length sweep at batch {FLAGS.sweep_batch}")
    print(f"{'cache':>6}{'new':>6}{'HF tok/s':>11}{'prefjax tok/s':>15}{'ratio':>8}")
    for length in FLAGS.cache_lengths:
        new = int(length) - FLAGS.prompt_len
        r = compare(model, hf, FLAGS.sweep_batch, new, seed=100 + new)
        results["sweep"].append(r)
        print(
            f"{length:>6}{new:>6}{r['hf_tok_s']:>11.0f}{r['prefjax_tok_s']:>15.0f}"
            f"{r['ratio']:>8.2f}"
        )
    if FLAGS.step_batch > 0:
        steps = step_times(model, FLAGS.step_batch)
        results["step"] = steps
        print(f"decode step at batch {FLAGS.step_batch}, {FLAGS.prompt_len}+ tokens held:")
        for slots, s in steps.items():
            print(
                f"  {slots:>5} slots: {s['step_ms']:.2f} ms, "
                f"{s['bytes_accessed'] / 1e6:.1f} MB accessed"
            )
        print(f"  2048 / 256 slots: {steps[2048]['step_ms'] / steps[256]['step_ms']:.2f}x")
    out = FLAGS.json_out or os.path.join(os.environ.get("OUT", "."), "rollout.json")
    with open(out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    app.run(main)
