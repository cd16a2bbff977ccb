"""cluster.yaml: valid for the installed Ray's autoscaler schema, one token for the whole cluster (made on the head,
handed to the workers), token auth on every node, dashboard on the head's localhost only."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
TOKEN = "/home/ubuntu/.ray/auth_token"


@pytest.fixture(scope="module")
def cluster_yaml() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


@pytest.fixture(scope="module")
def schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_cluster_yaml_matches_the_autoscaler_schema(cluster_yaml, schema):
    from ray.autoscaler._private.util import prepare_config, validate_config

    jsonschema.validate(cluster_yaml, schema)
    validate_config(prepare_config(copy.deepcopy(cluster_yaml)))  # what `ray up` checks, after filling defaults
    broken = copy.deepcopy(cluster_yaml)
    broken["available_node_types"]["head"]["resources"] = {"CPU": "zero"}
    with pytest.raises(jsonschema.ValidationError):  # the check can fail
        jsonschema.validate(broken, schema)


def test_one_token_made_on_the_head_and_synced_to_workers(cluster_yaml):
    c = cluster_yaml
    every_node = " ".join(c.get("setup_commands", []) + c.get("initialization_commands", []))
    assert "auth-token" not in every_node and "auth_token" not in every_node  # a token per node never matches
    head_setup = " ".join(c["head_setup_commands"])
    assert "ray get-auth-token --generate" in head_setup  # generates only when no token was mounted
    assert TOKEN in c["cluster_synced_files"]  # the head's autoscaler copies its file to each worker
    assert "auth_token" not in " ".join(c.get("worker_setup_commands", []))  # nothing on a worker makes its own


def test_token_auth_everywhere_and_dashboard_not_public(cluster_yaml):
    head = " ".join(c for c in cluster_yaml["head_start_ray_commands"] if "ray start" in c)
    workers = [c for c in cluster_yaml["worker_start_ray_commands"] if "ray start" in c]
    assert "RAY_AUTH_MODE=token" in head and workers and all("RAY_AUTH_MODE=token" in w for w in workers)
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in json.dumps(cluster_yaml)
    assert cluster_yaml["available_node_types"]["head"]["resources"] == {"CPU": 0}


def test_every_port_fixed_as_in_the_test_cluster_and_listed_in_the_readme(cluster_yaml):
    """No port is left to Ray's random choice, the namespace cluster pins the same ones, and README "Ports" names
    each (who reaches it is the README's and cluster.yaml's comment's to say; test_cluster checks what listens)."""
    from tests.cluster.netns import NODE_PORT_FLAGS

    head = " ".join(c for c in cluster_yaml["head_start_ray_commands"] if "ray start" in c).split()
    worker = " ".join(c for c in cluster_yaml["worker_start_ray_commands"] if "ray start" in c).split()
    for flags in (head, worker):
        assert set(NODE_PORT_FLAGS) <= set(flags) and "--metrics-export-port=8080" in flags
    assert "--ray-client-server-port=10001" in head and "--port=6379" in head
    readme = (REPO / "README.md").read_text()
    ports = readme.split("### Ports")[1].split("\n## ")[0]
    for flag in [*NODE_PORT_FLAGS, "--metrics-export-port=8080", "--ray-client-server-port=10001", "--port=6379"]:
        number = flag.split("=")[1]
        assert number in ports, flag
    assert all(n in ports for n in ("8265", "44217", "44227", "22"))
