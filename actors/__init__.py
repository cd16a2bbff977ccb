"""Ray actors: thin wrappers that own a resource (a model on a device) and expose a small API.

One file per role: rollout_engine.py, decoder_pool.py, reward_models.py, trainer.py.
"""
