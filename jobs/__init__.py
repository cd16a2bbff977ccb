"""Entry points (``python -m jobs.<name> --config configs/<file>.yaml [a.b=c ...]``), also run via ``ray job submit``.

CONFIG_SCHEMAS maps a config file (by stem, or by its folder under configs/) to the dataclass that validates it.
"""
from uniar_ray.config import DemoConfig, EvalConfig, GRPORunConfig, SweepConfig

CONFIG_SCHEMAS = {"demo": DemoConfig, "eval": EvalConfig, "sweep": SweepConfig, "sweep_grpo_run": SweepConfig,
                  "grpo_demo": GRPORunConfig, "grpo_uniar_rl": GRPORunConfig}


def start_ray(cfg) -> bool:
    """Join ``cfg.cluster.address`` when it is set, else start an embedded local Ray (``address="local"``: never an
    unrelated Ray on the machine, nor RAY_ADDRESS from the environment); say which. True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    from jobs.entry import keep_stop_handlers

    try:
        with keep_stop_handlers():  # a SIGTERM during the start-up stops the job like any other
            _init(ray, cfg.cluster)
    except BaseException:  # stopped (or failed) half-way: what was started goes with it
        ray.shutdown()
        raise
    return True


def _init(ray, c) -> None:
    import os
    import sys

    if c.address:
        ray.init(address=c.address)
        print(f"[ray] joined the cluster at {c.address} (GCS {ray.get_runtime_context().gcs_address})", file=sys.stderr)
    else:
        ignored = f"; RAY_ADDRESS={os.environ['RAY_ADDRESS']} ignored" if os.environ.get("RAY_ADDRESS") else ""
        init_local_ray(num_cpus=c.num_cpus or None, include_dashboard=c.dashboard, log_to_driver=c.log_to_driver)
        print(f"[ray] started an embedded local Ray (GCS {ray.get_runtime_context().gcs_address}{ignored}; "
              f"set cluster.address=auto to join a cluster)", file=sys.stderr)


def init_local_ray(**kwargs) -> None:
    """A new embedded Ray on this machine (jobs, perf scripts), with a token of its own unless the user set one."""
    import ray

    _token_for_local_ray()
    ray.init(address="local", **kwargs)


def _token_for_local_ray() -> None:
    """Ray 2.60 turns token auth on for a new local Ray and, finding no token, writes ~/.ray/auth_token, after which
    every Ray on the machine requires it. When the user has configured no token, the embedded Ray gets one of its
    own through the environment (its processes inherit it): still authenticated, and nothing written to the home."""
    import os
    import secrets
    from pathlib import Path

    configured = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
    if not any(os.environ.get(k) for k in configured) and not (Path.home() / ".ray" / "auth_token").exists():
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
