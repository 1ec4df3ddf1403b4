from .train.grad_cache import *  # noqa: F401,F403 - the cached step moved to scale_fast/train/grad_cache.py
