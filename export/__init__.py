"""Model aliases for `ortzo export`: data files, a package only so that importlib.resources finds them."""
