"""Examples (a package so that `python -m examples.gemma` finds this one, not another
installed top-level `examples`)."""
