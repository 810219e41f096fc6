r"""A beta sweep of DPO in one compiled step: K policies, one reference, one batch stream.

Command (the embedded default: four betas of the DPO launcher's default run)::

    python -m experiments.sweep                     # tiny model, built-in sequence task, CPU

It runs the SFT warm-up once (``<workdir>/sft_warmup``: the initial policy and the frozen
reference every member shares), then trains one DPO policy per ``sweep.beta`` value in one
jitted step (``prefjax.train.sweep``), writing ``runs/dpo_sweep_tiny/beta=<value>/`` for each
member (``run.json``, ``metrics.jsonl``, ``checkpoints/``, ``curves.png``, ``summary.txt``: the
single DPO run with that beta) and, across members, ``sweep.png`` (held-out gold reward, sampled
KL to the reference and accuracy against beta) and ``summary.txt``. Other axes multiply::

    python -m experiments.sweep --config.sweep.beta="(0.1, 0.5)" \
        --config.sweep.learning_rate="(1e-4, 3e-4)" --config.sweep.seed="(0, 1)" \
        --workdir=runs/grid                          # 2 x 2 x 2 = 8 members

What to look for: beta is the strength of the KL regularisation, so along the beta axis of
``sweep.png`` the sampled KL to the reference should fall as beta grows, and the gold reward
shows which strength this task rewards. Each member's directory reads like the single run
``python -m experiments.dpo --config.algorithm.beta=<value>`` from the same warm-up, and equals
it to float32 rounding (``tests/experiments/test_sweep_launcher.py``).

Expected runtime: the DPO default's (about 30 s on 2 CPU cores) plus, per member, its share of
the train steps and its evaluations; compilation and the warm-up are paid once, not per member.
"""

from experiments.configs import dpo
from prefjax.train import sweep


def get_config(arg=None):
    config = dpo.get_config(arg)
    config.workdir_default = config.workdir_default.replace("dpo_", "dpo_sweep_")
    config.sweep = sweep.default_config()
    config.sweep.beta = (0.1, 0.25, 0.5, 1.0)
    return config
