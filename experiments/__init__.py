"""Command-line launchers: ``python -m experiments.<algo>`` (sft, reward_model, dpo).

Configs live in ``experiments/configs/``.
"""
