"""A Gemma-4-style inference example in plain JAX with jax_fa4 attention (random
weights, or a checkpoint's parameter tree via checkpoint.py).  Run:

    python -m examples.gemma --preset tiny
"""
