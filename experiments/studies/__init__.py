"""Studies: the field's central claims reproduced on tasks with a known gold reward.

One absl launcher per study, ``python -m experiments.studies.<name> [--config=...:tiny]``,
each writing its data (JSONL and CSV), figures (PNG) and a markdown summary into its workdir;
configs live in ``experiments/configs/studies/``. ``docs/studies.md`` shows the results.
"""
