"""The vLLM-backed rollout engine: UniAR as an out-of-tree vLLM model with the bitwise sampler in a runner subclass.

``from uniar_ray.rollout.vllm_engine import VLLMRolloutEngine``; the package itself imports nothing at load time,
because vLLM imports ``plugin`` in every one of its processes.
"""


def __getattr__(name):
    if name == "VLLMRolloutEngine":
        from .engine import VLLMRolloutEngine

        return VLLMRolloutEngine
    raise AttributeError(name)
