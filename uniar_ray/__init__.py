"""uniar-ray: the library (no Ray): config, UniAR model, BSQ bits, sampler, rollout engines, decoder, GRPO math.

Ray actors (``actors/``) and jobs (``jobs/``) wrap it; everything here is unit-testable without Ray.
"""
__version__ = "0.1.0"
