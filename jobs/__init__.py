"""Entry points (``python -m jobs.<name> --config configs/<file>.yaml [a.b=c ...]``), also run via ``ray job submit``.

CONFIG_SCHEMAS maps a config file (by stem, or by its folder under configs/) to the dataclass that validates it.
"""
from uniar_ray.config import DemoConfig, EvalConfig, GRPORunConfig, SweepConfig

CONFIG_SCHEMAS = {"demo": DemoConfig, "eval": EvalConfig, "sweep": SweepConfig, "sweep_grpo_run": SweepConfig,
                  "grpo_demo": GRPORunConfig, "grpo_uniar_rl": GRPORunConfig}
