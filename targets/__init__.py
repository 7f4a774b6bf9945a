"""Target configs: data files, a package only so that importlib.resources finds them installed."""
