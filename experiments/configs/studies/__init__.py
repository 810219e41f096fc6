"""ml_collections configs of the studies, one file per study, each with ``:tiny`` (the test
suite's, minutes on 2 CPU cores) and ``:full`` (a GPU) presets."""
