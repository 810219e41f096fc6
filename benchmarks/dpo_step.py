r"""Speed and memory of the jitted DPO train step: tokens/s, step time, MFU, peak memory.

Times ``prefjax.train.setup.build_setup(..., dpo).train_step`` -- the exact step the launchers run
(one forward over the ``[batch, 2, seq]`` pairs flattened to ``[2 * batch, seq]``, frozen-copy or
precomputed reference, AdamW, global-norm clipping) -- on random tokens of a fixed shape:
``batch_pairs`` pairs of ``seq_len`` tokens, the last ``seq_len - prompt_len`` of each being the
response. The step time is the median over
``--steps`` timed steps after two untimed (compiling) steps.

MFU = ``k * N * tokens / step_time / peak`` with ``N`` the matmul parameters (all but the input
embedding), ``tokens = 2 * batch_pairs * seq_len`` and ``k = 8`` (policy forward + backward = 6,
reference forward = 2) for ``--reference=copy`` or ``k = 6`` for ``--reference=precomputed``;
the peer scripts (TRL, plain PyTorch) count the same way. ``peak`` is 989e12 FLOP/s for an
H100/H200 (dense bf16), 312e12 for an A100, else (CPU) a measured float32
matmul rate on this machine.

With ``--torch`` the same step written in plain PyTorch on a Hugging Face ``LlamaForCausalLM`` of
the same shape is timed in the same process (CPU or GPU), and the ratio printed; TRL's
``DPOTrainer`` is timed by the peers' ``run.sh`` in the same device call (see README.md).

Examples::

    python -m benchmarks.dpo_step --preset=tiny --batch_pairs=8 --seq_len=128 --prompt_len=64 \
        --dtype=float32 --torch
    python -m benchmarks.dpo_step --preset=llama1b --vocab=32000 --batch_pairs=8 --seq_len=512 \
        --prompt_len=256 --dtype=bfloat16 --attention=cudnn --chunked_logps=2048 --steps=10
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "tiny", "Model preset: tiny | gpt2 | llama1b.")
flags.DEFINE_integer("batch_pairs", 8, "Preference pairs per step (2x sequences).")
flags.DEFINE_integer("seq_len", 128, "Tokens per sequence (prompt + response).")
flags.DEFINE_integer("prompt_len", 64, "Prompt tokens per sequence (the rest is the response).")
flags.DEFINE_integer("vocab", 0, "Vocabulary size override (0 = the preset's).")
flags.DEFINE_enum(
    "tie", "preset", ["preset", "true", "false"], "Tied input/output embeddings (peers: false)."
)
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Compute dtype (params: f32).")
flags.DEFINE_string("attention", "", "Attention implementation: '' (JAX chooses) | xla | cudnn.")
flags.DEFINE_integer("chunked_logps", 0, "Tokens per vocabulary chunk of the log-probs (0 = off).")
flags.DEFINE_enum("reference", "copy", ["copy", "precomputed"], "Reference handling.")
flags.DEFINE_enum("remat", "none", ["none", "full", "dots"], "Activation rematerialisation.")
flags.DEFINE_integer("steps", 10, "Timed steps (after 2 compiling steps).")
flags.DEFINE_float("peak_flops", 0.0, "Peak FLOP/s for MFU (0 = by device kind / measured).")
flags.DEFINE_bool("torch", False, "Also time the same step in plain PyTorch (transformers Llama).")
flags.DEFINE_bool("torch_only", False, "Internal: time only the PyTorch step, print its JSON.")
flags.DEFINE_bool("torch_worker", False, "Internal: run PyTorch steps on request (stdin).")
flags.DEFINE_bool("scan_unroll", False, "Unroll the layer scan (TransformerConfig.scan_unroll).")
flags.DEFINE_string("json_out", "", "Write the results as JSON here (default: $OUT/dpo_step.json).")
flags.DEFINE_string(
    "lengths",
    "",
    "'' = fixed-shape random pairs (seq_len tokens each); else a prefjax.data.lengths profile "
    "(hh_helpful | uniform): pairs with those token counts (truncated to prompt_len / seq_len), "
    "timed as real (non-padding) tokens/s over --num_batches batches.",
)
flags.DEFINE_bool("packing", False, "With --lengths: also time packed batches of the same pairs.")
flags.DEFINE_integer("num_batches", 4, "With --lengths: distinct batches timed per pass.")

PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def measured_matmul_peak(jnp, jax, n: int = 1024, reps: int = 10) -> float:
    """FLOP/s of a float32 ``n x n`` matmul on the default device (a CPU's practical peak)."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / min(times)


def device_peak(jax, jnp) -> tuple[float, str]:
    if FLAGS.peak_flops:
        return FLAGS.peak_flops, "given"
    kind = jax.devices()[0].device_kind
    for name, peak in PEAKS.items():
        if name in kind:
            return peak, f"{name} dense bf16"
    return measured_matmul_peak(jnp, jax), "measured f32 matmul (CPU)"


def peak_memory_gb(jax) -> tuple[float, str]:
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 1e9, "device peak_bytes_in_use"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, "host max RSS (process)"


def make_batch(np, vocab: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    b, t, p = FLAGS.batch_pairs, FLAGS.seq_len, FLAGS.prompt_len
    shape = (b, 2, t)  # pairs: [batch, (chosen, rejected), seq]
    loss_mask = np.zeros(shape, np.int32)
    loss_mask[..., p:] = 1
    prompt = np.repeat(rng.integers(3, vocab, (b, 1, p), dtype=np.int32), 2, axis=1)
    response = rng.integers(3, vocab, (b, 2, t - p), dtype=np.int32)
    return {
        "input_ids": np.concatenate([prompt, response], 2),
        "attention_mask": np.ones(shape, np.int32),
        "loss_mask": loss_mask,
    }


def length_batches(np, vocab: int) -> tuple[list[dict], list[dict], int]:
    """``--lengths``: the padded and packed batches of ``num_batches * batch_pairs`` pairs with
    token counts from the profile, and the real (non-padding) tokens of one pass over them.

    Padded batches use the default buckets (powers of two up to ``seq_len``); packed rows are
    ``seq_len`` long. Both hold the same pairs in the same batches (a deterministic plan).
    """
    from prefjax import data
    from prefjax.data import lengths
    from prefjax.data.dataset import TokenizedDataset, object_array

    n = FLAGS.batch_pairs * FLAGS.num_batches
    p, c, r = lengths.sample_pair_lengths(
        FLAGS.lengths, n, max_len=FLAGS.seq_len, max_prompt_len=FLAGS.prompt_len, seed=0
    )
    rng = np.random.default_rng(0)
    tok = lambda k: rng.integers(3, vocab, int(k), dtype=np.int32)  # noqa: E731
    cols = {
        "prompt_ids": object_array([tok(k) for k in p]),
        "chosen_ids": object_array([tok(k) for k in c]),
        "rejected_ids": object_array([tok(k) for k in r]),
        "prompt_id": object_array([str(i) for i in range(n)]),
    }
    ds = TokenizedDataset("pairwise", cols, pad_id=0, max_len=FLAGS.seq_len)
    kw = dict(shuffle=False, num_epochs=1, process_index=0, process_count=1)
    padded = list(data.BatchIterator(ds, FLAGS.batch_pairs, **kw))
    packed = list(data.BatchIterator(ds, FLAGS.batch_pairs, packing=True, **kw))
    return padded, packed, int((p + c).sum() + (p + r).sum())


def shape_overrides() -> dict:
    out = {"vocab_size": FLAGS.vocab} if FLAGS.vocab else {}
    if FLAGS.tie != "preset":
        out["tie_embeddings"] = FLAGS.tie == "true"
    return out


def prefjax_parts() -> tuple:
    """``(model, config, mesh)`` of the flags: the preset with its overrides, a DPO run config."""
    import jax
    import jax.numpy as jnp

    from experiments.configs import common as config_common
    from prefjax import models
    from prefjax import sharding as shd

    overrides = {"dtype": jnp.dtype(FLAGS.dtype), "param_dtype": jnp.float32, "remat": FLAGS.remat}
    overrides["attention_impl"] = FLAGS.attention or None
    overrides["scan_unroll"] = FLAGS.scan_unroll
    overrides.update(shape_overrides())
    model = models.from_preset(FLAGS.preset, key=jax.random.key(0), **overrides)
    config = config_common.base_config("dpo")
    config.data.batch_size = FLAGS.batch_pairs
    config.algorithm.reference = FLAGS.reference
    config.model.logps_chunk_size = FLAGS.chunked_logps
    config.optimizer.learning_rate = 1e-6
    config.optimizer.warmup_steps = 0
    config.optimizer.clip_norm = 1.0
    config.train.num_steps = 1000
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, -1, 1
    return model, config, shd.make_mesh(config.mesh)


def build_prefjax(parts: tuple | None = None) -> tuple:
    """``(run_step, info)`` on the fixed-shape batch: one call of ``run_step()`` runs one jitted
    DPO step to completion; ``info["hlo_text"]()`` is the compiled step's HLO."""
    import jax
    import numpy as np

    from prefjax import models
    from prefjax.train import dpo
    from prefjax.train import setup as train_setup

    model, config, mesh = prefjax_parts() if parts is None else parts
    cfg = model.config
    batch = make_batch(np, cfg.vocab_size)
    if FLAGS.reference == "precomputed":
        batch.update(
            dpo.precompute_reference_logps(
                model, model.params, [batch], mesh=mesh, chunk_size=FLAGS.chunked_logps
            )
        )
    setup = train_setup.build_setup(config, model, mesh, jax.random.key(1), dpo)
    n_params = models.param_count(model.params)
    # All but the input embedding (a tied embedding still does the output matmul).
    n_matmul = n_params - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.hidden_size)
    del model
    sharded = setup.shard_batch(batch)
    holder = {"state": setup.state}

    def run_step():
        holder["state"], metrics = setup.train_step(
            holder["state"], sharded, setup.frozen, jax.random.key(0)
        )
        holder["loss"] = metrics["loss"].block_until_ready()

    def hlo_text():
        args = (holder["state"], sharded, setup.frozen, jax.random.key(0))
        return setup.train_step.lower(*args).compile().as_text()

    info = {"n_params": n_params, "n_matmul": n_matmul, "holder": holder, "hlo_text": hlo_text}
    return run_step, info


def time_prefjax() -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from prefjax import models
    from prefjax.train import dpo
    from prefjax.train import setup as train_setup

    parts = prefjax_parts()
    if FLAGS.lengths:
        model, config, mesh = parts
        return time_prefjax_lengths(jax, jnp, np, model, config, mesh, dpo, train_setup, models)
    run_step, info = build_prefjax(parts)
    compile_s = warm_up(run_step)
    return prefjax_result([timed(run_step) for _ in range(FLAGS.steps)], compile_s, info)


def prefjax_result(times: list[float], compile_s: float, info: dict) -> dict:
    """The JSON record of the prefjax step from its timed steps."""
    import jax
    import jax.numpy as jnp

    step_s = statistics.median(times)
    tokens = 2 * FLAGS.batch_pairs * FLAGS.seq_len
    k = 8 if FLAGS.reference == "copy" else 6
    n_matmul = info["n_matmul"]
    peak, peak_kind = device_peak(jax, jnp)
    mem, mem_kind = peak_memory_gb(jax)
    return {
        "system": "prefjax",
        "jax": jax.__version__,
        "device": jax.devices()[0].device_kind,
        "num_devices": jax.device_count(),
        "n_params": info["n_params"],
        "n_matmul_params": n_matmul,
        "step_s": step_s,
        "tokens_per_s": tokens / step_s,
        "model_flops_per_step": k * n_matmul * tokens,
        "mfu": k * n_matmul * tokens / step_s / peak,
        "mfu_8N": 8 * n_matmul * tokens / step_s / peak,
        "peak_flops": peak,
        "peak_kind": peak_kind,
        "peak_mem_gb": mem,
        "mem_kind": mem_kind,
        "compile_and_first_step_s": compile_s,
        "loss": float(info["holder"]["loss"]),
        "times": times,
    }


def timed(run_step) -> float:
    t = time.perf_counter()
    run_step()
    return time.perf_counter() - t


def warm_up(run_step) -> float:
    """Seconds of two untimed steps (compilation + one warm step)."""
    return timed(run_step) + timed(run_step)


def time_prefjax_lengths(jax, jnp, np, model, config, mesh, dpo, train_setup, models) -> dict:
    """``--lengths``: real tokens/s of padded (and with ``--packing`` packed) batches of the same
    pairs, measured interleaved: ``--steps`` rounds of one pass over the padded batches then one
    over the packed ones, after an untimed pass each (compiling every shape); medians."""
    padded, packed, real = length_batches(np, model.config.vocab_size)
    layouts = {"padded": padded, **({"packed": packed} if FLAGS.packing else {})}
    if FLAGS.reference == "precomputed":  # per pair, from the padded batches, for both layouts
        refs = [dpo.precompute_reference_logps(model, model.params, [b], mesh=mesh) for b in padded]
        layouts = {
            k: [{**b, **ref} for b, ref in zip(v, refs, strict=True)] for k, v in layouts.items()
        }
    setup = train_setup.build_setup(config, model, mesh, jax.random.key(1), dpo)
    state = setup.state
    sharded = {k: [setup.shard_batch(b) for b in v] for k, v in layouts.items()}

    def one_pass(batches):
        nonlocal state
        t = time.perf_counter()
        for b in batches:
            state, metrics = setup.train_step(state, b, setup.frozen, jax.random.key(0))
        metrics["loss"].block_until_ready()
        return time.perf_counter() - t

    t0 = time.perf_counter()
    for batches in sharded.values():
        one_pass(batches)  # compiles every shape
    compile_s = time.perf_counter() - t0
    times = {k: [] for k in sharded}
    for _ in range(FLAGS.steps):
        for name, batches in sharded.items():
            times[name].append(one_pass(batches))
    out = {
        "system": "prefjax",
        "jax": jax.__version__,
        "device": jax.devices()[0].device_kind,
        "lengths": FLAGS.lengths,
        "real_tokens_per_pass": real,
        "compile_and_first_passes_s": compile_s,
    }
    for name, batches in layouts.items():
        slots = sum(b["input_ids"].size for b in batches)
        med = statistics.median(times[name])
        out[name] = {
            "pass_s": med,
            "real_tokens_per_s": real / med,
            "token_slots_per_pass": slots,
            "padding_fraction": 1 - real / slots,
            "shapes": sorted({tuple(b["input_ids"].shape) for b in batches}),
            "times": times[name],
        }
    if "packed" in out:
        out["packed_over_padded"] = (
            out["packed"]["real_tokens_per_s"] / out["padded"]["real_tokens_per_s"]
        )
    out["tokens_per_s"] = out["padded"]["real_tokens_per_s"]
    return out


def time_torch_lengths(torch, F, policy, ref, opt, device, sync) -> dict:
    """``--lengths``: plain PyTorch on the padded batches of the same pairs (same buckets)."""

    from prefjax import data
    from prefjax.data import lengths

    n = FLAGS.batch_pairs * FLAGS.num_batches
    p, c, r = lengths.sample_pair_lengths(
        FLAGS.lengths, n, max_len=FLAGS.seq_len, max_prompt_len=FLAGS.prompt_len, seed=0
    )
    buckets = data.default_buckets(FLAGS.seq_len)
    vocab = policy.config.vocab_size
    b = FLAGS.batch_pairs
    batches = []
    for j in range(FLAGS.num_batches):
        sl = slice(j * b, (j + 1) * b)
        pp, cc, rr = p[sl], c[sl], r[sl]
        t = data.bucket_length(int(max((pp + cc).max(), (pp + rr).max())), buckets)
        ids = torch.randint(3, vocab, (2 * b, t), device=device)
        attn = torch.zeros(2 * b, t, device=device, dtype=torch.long)
        resp = torch.zeros(2 * b, t, device=device)
        for i, (lp, lr) in enumerate(
            list(zip(pp, cc, strict=True)) + list(zip(pp, rr, strict=True))
        ):
            attn[i, : lp + lr] = 1
            resp[i, lp : lp + lr] = 1
        batches.append((ids, attn, resp[:, 1:]))
    real = int((p + c).sum() + (p + r).sum())

    def seq_logps(model, ids, attn, mask):
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
        lp = torch.gather(logits.log_softmax(-1), 2, ids[:, 1:, None]).squeeze(-1)
        return (lp * mask).sum(-1)

    def step(ids, attn, mask):
        with torch.no_grad():
            rl = seq_logps(ref, ids, attn, mask)
        pl = seq_logps(policy, ids, attn, mask)
        x = 0.1 * ((pl[:b] - rl[:b]) - (pl[b:] - rl[b:]))
        loss = -F.logsigmoid(x).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def one_pass():
        t0 = time.perf_counter()
        for batch in batches:
            step(*batch)
        sync()
        return time.perf_counter() - t0

    one_pass()
    times = [one_pass() for _ in range(FLAGS.steps)]
    med = statistics.median(times)
    return {
        "system": f"pytorch-eager-{device}",
        "torch": torch.__version__,
        "lengths": FLAGS.lengths,
        "pass_s": med,
        "real_tokens_per_s": real / med,
        "tokens_per_s": real / med,
        "times": times,
    }


def hf_model(cfg):
    """A randomly initialised ``transformers`` model of ``cfg``'s architecture: GPT-2 for the
    gpt2 preset (LayerNorm, GELU, learned positions, biases, tied), else Llama."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if cfg.model_type == "gpt2":
        gcfg = GPT2Config(
            n_embd=cfg.hidden_size,
            n_layer=cfg.num_layers,
            n_head=cfg.num_heads,
            n_inner=cfg.mlp_dim,
            n_positions=cfg.max_positions,
            vocab_size=cfg.vocab_size,
            activation_function="gelu_new",
            tie_word_embeddings=cfg.tie_embeddings,
            attn_implementation="sdpa",
        )
        return GPT2LMHeadModel(gcfg)
    lcfg = LlamaConfig(
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        intermediate_size=cfg.mlp_dim,
        vocab_size=cfg.vocab_size,
        max_position_embeddings=max(FLAGS.seq_len, 128),
        tie_word_embeddings=cfg.tie_embeddings,
        head_dim=cfg.resolved_head_dim,
    )
    lcfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(lcfg)


def torch_parts(n_threads: int) -> tuple:
    """``(torch, F, cfg, policy, ref, opt, device, sync, n_matmul)``: the PyTorch policy and
    frozen reference (same weights) of :func:`hf_model`, AdamW, the device's sync."""
    import torch
    import torch.nn.functional as F

    from prefjax import models

    cfg = models.preset(FLAGS.preset, **shape_overrides())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(n_threads)
    dtype = torch.bfloat16 if FLAGS.dtype == "bfloat16" else torch.float32
    torch.manual_seed(0)
    policy = hf_model(cfg).to(device, dtype)
    ref = hf_model(cfg).to(device, dtype).eval()
    ref.load_state_dict(policy.state_dict())
    for p in ref.parameters():
        p.requires_grad_(False)
    n_params = sum(p.numel() for p in policy.parameters())
    n_matmul = n_params - policy.get_input_embeddings().weight.numel()
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-6, fused=device == "cuda")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    return torch, F, cfg, policy, ref, opt, device, sync, n_matmul


def build_torch(n_threads: int) -> tuple:
    """``(run_step, info)`` of the same DPO step in plain PyTorch (the peers' torch_dpo.py logic
    at this shape, on the same architecture: :func:`hf_model`); ``run_step()`` returns when the
    step is done."""
    torch, F, cfg, policy, ref, opt, device, sync, n_matmul = torch_parts(n_threads)
    b, t, p = FLAGS.batch_pairs, FLAGS.seq_len, FLAGS.prompt_len
    ids = torch.randint(3, cfg.vocab_size, (2 * b, t), device=device)
    mask = torch.zeros(2 * b, t - 1, device=device)
    mask[:, p - 1 :] = 1

    def seq_logps(model):
        logits = model(input_ids=ids).logits[:, :-1].float()
        lp = torch.gather(logits.log_softmax(-1), 2, ids[:, 1:, None]).squeeze(-1)
        return (lp * mask).sum(-1)

    def step():
        with torch.no_grad():
            r = seq_logps(ref)
        pl = seq_logps(policy)
        x = 0.1 * ((pl[:b] - r[:b]) - (pl[b:] - r[b:]))
        loss = -F.logsigmoid(x).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def run_step():
        step()
        sync()

    info = {
        "system": f"pytorch-eager-{device}",
        "torch": torch.__version__,
        "n_matmul_params": n_matmul,
    }
    return run_step, info


def time_torch(n_threads: int) -> dict:
    """The PyTorch step timed on its own (``--lengths``: over the padded batches)."""
    if FLAGS.lengths:
        torch, F, _, policy, ref, opt, device, sync, _ = torch_parts(n_threads)
        return time_torch_lengths(torch, F, policy, ref, opt, device, sync)
    run_step, info = build_torch(n_threads)
    warm_up(run_step)
    return torch_result([timed(run_step) for _ in range(FLAGS.steps)], info)


def torch_worker() -> None:
    """Runs PyTorch steps on request (``--torch_worker``): prints ``READY`` once built and warm,
    then for each ``step`` line on stdin runs one step and prints its seconds; ``info`` prints
    the step's description as JSON."""
    run_step, info = build_torch(os.cpu_count() or 1)
    warm_up(run_step)
    print("READY", flush=True)
    for line in sys.stdin:
        if line.strip() == "step":
            print(f"{timed(run_step)!r}", flush=True)
        elif line.strip() == "info":
            print(json.dumps(info), flush=True)


class TorchPeer:
    """A ``--torch_worker`` subprocess (its own runtime and thread pools), stepped on request so
    that its steps interleave with prefjax's under the same machine load."""

    def __init__(self):
        argv = [a for a in sys.argv[1:] if not a.startswith(("--torch", "--json_out"))]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.dpo_step", "--torch_worker", *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._expect("READY")

    def _expect(self, word: str) -> None:
        for line in self.proc.stdout:
            if line.startswith(word):
                return
        raise RuntimeError(f"the PyTorch worker exited before printing {word}")

    def _ask(self, command: str) -> str:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline()

    def step(self) -> float:
        return float(self._ask("step"))

    def info(self) -> dict:
        return json.loads(self._ask("info"))

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def torch_result(times: list[float], info: dict) -> dict:
    step_s = statistics.median(times)
    tokens = 2 * FLAGS.batch_pairs * FLAGS.seq_len
    return {**info, "step_s": step_s, "tokens_per_s": tokens / step_s, "times": times}


def time_interleaved() -> tuple[dict, dict | None]:
    """The fixed-shape step, and with ``--torch`` the PyTorch step interleaved with it (one
    prefjax step, then one PyTorch step in the worker process, ``--steps`` times), so that both
    see the same machine load: ``(prefjax result, torch result or None)``."""
    run_step, info = build_prefjax()
    compile_s = warm_up(run_step)
    peer = None
    if FLAGS.torch:
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError:
            pass  # reported by main
        else:
            peer = TorchPeer()
    times, torch_times = [], []
    for _ in range(FLAGS.steps):
        times.append(timed(run_step))
        if peer is not None:
            torch_times.append(peer.step())
    torch_res = None
    if peer is not None:
        torch_res = torch_result(torch_times, peer.info())
        peer.close()
    return prefjax_result(times, compile_s, info), torch_res


def main(argv):
    del argv
    if FLAGS.prompt_len >= FLAGS.seq_len:
        raise app.UsageError("--prompt_len must be smaller than --seq_len")
    if FLAGS.torch_only:
        print("TORCH_RESULT " + json.dumps(time_torch(os.cpu_count() or 1)))
        return
    if FLAGS.torch_worker:
        torch_worker()
        return
    results = {
        "args": {
            k: FLAGS[k].value
            for k in (
                "preset",
                "batch_pairs",
                "seq_len",
                "prompt_len",
                "vocab",
                "dtype",
                "attention",
                "chunked_logps",
                "reference",
                "remat",
                "steps",
                "tie",
                "scan_unroll",
                "lengths",
                "packing",
                "num_batches",
            )
        }
    }
    torch_interleaved = None
    if FLAGS.lengths:
        results["prefjax"] = time_prefjax()
    else:
        results["prefjax"], torch_interleaved = time_interleaved()
    r = results["prefjax"]
    if FLAGS.lengths:
        for name in ("padded", "packed"):
            if name in r:
                x = r[name]
                print(
                    f"prefjax {name:>6} ({FLAGS.lengths}): {x['real_tokens_per_s']:,.0f} real "
                    f"tokens/s, {x['pass_s'] * 1e3:.0f} ms per pass of {FLAGS.num_batches} "
                    f"batches, padding {100 * x['padding_fraction']:.0f}% of "
                    f"{x['token_slots_per_pass']:,} slots, shapes {x['shapes']}",
                    flush=True,
                )
        if "packed_over_padded" in r:
            print(f"packed / padded = {r['packed_over_padded']:.2f}x (real tokens/s)", flush=True)
    else:
        print(
            f"prefjax  {r['device']}: {r['step_s'] * 1e3:.1f} ms/step, "
            f"{r['tokens_per_s']:,.0f} tokens/s, "
            f"MFU {100 * r['mfu']:.1f}% of {r['peak_flops'] / 1e12:.2f} TF/s ({r['peak_kind']}), "
            f"peak memory {r['peak_mem_gb']:.2f} GB ({r['mem_kind']})",
            flush=True,
        )
    if FLAGS.torch:
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError as err:
            print(f"--torch: {err}; skipping the PyTorch comparison")
        else:
            if torch_interleaved is None:
                # A separate process, so that neither runtime's thread pools slow the other.
                argv = [a for a in sys.argv[1:] if not a.startswith(("--torch", "--json_out"))]
                proc = subprocess.run(
                    [sys.executable, "-m", "benchmarks.dpo_step", "--torch_only", *argv],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                line = [x for x in proc.stdout.splitlines() if x.startswith("TORCH_RESULT ")][-1]
                torch_interleaved = json.loads(line.split(" ", 1)[1])
            results["torch"] = t = torch_interleaved
            ratio = r["tokens_per_s"] / t["tokens_per_s"]
            results["ratio_prefjax_over_torch"] = ratio
            if FLAGS.lengths:
                packed = r.get("packed", {}).get("real_tokens_per_s")
                if packed:
                    results["ratio_packed_over_torch"] = packed / t["tokens_per_s"]
                print(
                    f"{t['system']} padded: {t['tokens_per_s']:,.0f} real tokens/s; prefjax "
                    f"padded / torch = {ratio:.2f}x"
                    + (
                        f", prefjax packed / torch = {packed / t['tokens_per_s']:.2f}x"
                        if packed
                        else ""
                    ),
                    flush=True,
                )
            else:
                print(
                    f"{t['system']}: {t['step_s'] * 1e3:.1f} ms/step, "
                    f"{t['tokens_per_s']:,.0f} tokens/s; "
                    f"prefjax / torch = {ratio:.2f}x",
                    flush=True,
                )
    out = FLAGS.json_out or (
        os.path.join(os.environ["OUT"], "dpo_step.json") if "OUT" in os.environ else ""
    )
    if out:
        with open(out, "w") as f:
            json.dump(results, f, indent=2)
    print(
        json.dumps({k: v for k, v in results["prefjax"].items() if k != "times"}), file=sys.stderr
    )


if __name__ == "__main__":
    app.run(main)
