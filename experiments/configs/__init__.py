"""ml_collections configs of the launchers, one file per algorithm; ``common.py`` holds the shared
fields, their validation and the derived values."""
