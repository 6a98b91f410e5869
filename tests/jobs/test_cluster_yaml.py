"""cluster.yaml: valid for Ray's cluster launcher (checked offline) and set up the way docs/cluster.md says.

Ray validates a launcher config in two steps, both run here without SSH or a cluster:
`ray.autoscaler._private.util.prepare_config` fills in the local provider's defaults (and aborts on a
local provider without head_ip / worker_ips), then `validate_config` checks the result against the
packaged JSON schema `ray/autoscaler/ray-schema.json` plus a few rules of its own. Both are private
API, so the raw file is also checked against that schema directly with jsonschema (a dependency of Ray).
"""

from __future__ import annotations

import copy
import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = ROOT / "cluster.yaml"


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def ray_validate(cfg: dict) -> dict:
    """What `ray up` does to a config before it touches a machine; returns the prepared config."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def locked_versions(names: list[str]) -> dict[str, str]:
    """The versions uv.lock resolved for these packages."""
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    return {p["name"]: p["version"] for p in lock["package"] if p["name"] in names}


def commands(cfg: dict, key: str) -> str:
    return "\n".join(cfg.get(key) or [])


# --- Ray's own validation ------------------------------------------------------------------------------


def test_ray_prepare_and_validate_accept_it(config):
    prepared = ray_validate(config)
    assert prepared["provider"]["type"] == "local"
    # Head only: the local provider sizes the cluster from worker_ips.
    assert prepared["max_workers"] == len(config["provider"]["worker_ips"]) == 0
    # prepare_config folds setup_commands into the head's and the workers' lists.
    assert "uv sync --locked" in commands(prepared, "head_setup_commands")
    assert "uv sync --locked" in commands(prepared, "worker_setup_commands")


def test_packaged_json_schema_accepts_it(config):
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema (a Ray dependency) is not installed")
    jsonschema.validate(config, ray_schema())


def test_bogus_top_level_key_fails_validation(config):
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema (a Ray dependency) is not installed")
    bad = copy.deepcopy(config)
    bad["head_ips"] = ["192.0.2.10"]  # a plausible typo of provider.head_ip, at the wrong level
    with pytest.raises(jsonschema.ValidationError, match="head_ips"):
        ray_validate(bad)
    with pytest.raises(jsonschema.ValidationError, match="head_ips"):
        jsonschema.validate(bad, ray_schema())


def test_missing_provider_fails_validation(config):
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema (a Ray dependency) is not installed")
    bad = copy.deepcopy(config)
    del bad["provider"]
    with pytest.raises(KeyError, match="provider"):  # prepare_config cannot fill in defaults without one
        ray_validate(bad)
    with pytest.raises(jsonschema.ValidationError, match="'provider' is a required property"):
        jsonschema.validate(bad, ray_schema())


def test_local_provider_without_head_ip_fails_validation(config):
    bad = copy.deepcopy(config)
    del bad["provider"]["head_ip"]
    with pytest.raises(Exception, match="head_ip"):  # cli_logger.abort raises a click exception
        ray_validate(bad)


def test_misspelled_auth_key_fails_validation(config):
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema (a Ray dependency) is not installed")
    bad = copy.deepcopy(config)
    bad["auth"]["ssh_key"] = bad["auth"].pop("ssh_private_key")
    with pytest.raises(jsonschema.ValidationError, match="ssh_key"):
        ray_validate(bad)


# --- what the project needs from it --------------------------------------------------------------------


def test_one_local_gpu_box_head_only(config):
    assert config["cluster_name"] == "simba-ttm"
    provider = config["provider"]
    assert provider["type"] == "local"
    assert isinstance(provider["head_ip"], str) and provider["head_ip"]
    assert provider["worker_ips"] == []
    assert config["auth"]["ssh_user"]
    assert config["auth"]["ssh_private_key"] == "~/.ssh/id_ed25519"


def test_dashboard_stays_on_localhost(config):
    head = commands(config, "head_start_ray_commands")
    assert ".venv/bin/ray stop" in config["head_start_ray_commands"][0]  # stop, then start
    assert ".venv/bin/ray start --head" in head
    assert re.search(r"--dashboard-host[ =]127\.0\.0\.1(\s|$)", head)
    assert re.search(r"--dashboard-port[ =]8265(\s|$)", head)
    assert "--include-dashboard=true" in head
    assert "--num-gpus" not in head  # Ray detects the GPUs itself
    assert "0.0.0.0" not in CLUSTER_YAML.read_text()
    workers = commands(config, "worker_start_ray_commands")
    assert ".venv/bin/ray stop" in workers
    assert ".venv/bin/ray start --address=$RAY_HEAD_IP:6379" in workers


def test_setup_installs_the_locked_environment(config):
    setup = commands(config, "setup_commands")
    assert "python3 -m pip install --user uv" in setup
    assert "cd ~/simba-ttm && uv sync --locked" in setup
    # The install order matters: uv before the sync.
    assert setup.index("pip install --user uv") < setup.index("uv sync --locked")


def test_head_installs_the_cuda_kernels_from_pyproject(config, pyproject):
    head = commands(config, "head_setup_commands")
    specs = pyproject["project"]["optional-dependencies"]["cuda"]
    assert {re.split(r"[<>=!~ ]", s)[0] for s in specs} == {"mamba-ssm", "causal-conv1d"}
    install = next(c for c in config["head_setup_commands"] if "--no-build-isolation" in c)
    assert "uv pip install --no-build-isolation" in install
    locked = locked_versions(["mamba-ssm", "causal-conv1d"])
    assert len(locked) == 2, locked
    for name, version in locked.items():
        # the `cuda` extra at uv.lock's versions (the ones tested), so a relock cannot drift from what the box builds
        assert f'"{name}=={version}"' in install, f"{name} is not installed at uv.lock's {version} on the head"
        for doc in ("README.md", "docs/cluster.md"):  # the commands people copy say the same
            assert f'"{name}=={version}"' in (ROOT / doc).read_text(), f"{doc} does not install {name}=={version}"
    # Without build isolation the build tools must already be in the environment.
    assert head.index("setuptools") < head.index("--no-build-isolation")
    # CPU workers never build CUDA code.
    assert "mamba" not in commands(config, "setup_commands") + commands(config, "worker_setup_commands")


def test_file_mounts_carry_what_uv_sync_needs(config, pyproject):
    mounts = config["file_mounts"]
    for remote, local in mounts.items():
        assert remote.startswith("~/simba-ttm/"), remote
        assert (ROOT / local).exists(), f"file_mounts names {local}, which is not in the repository"
    local = set(mounts.values())
    packages = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    assert {"pyproject.toml", "uv.lock", pyproject["project"]["readme"], *packages} <= local


def test_ray_dashboard_dependencies_are_declared(pyproject):
    """The dashboard, and with it `ray job submit`, needs Ray's `default` extra on the box."""
    ray_reqs = [r for r in pyproject["project"]["dependencies"] if re.match(r"ray\[", r)]
    assert ray_reqs, "pyproject.toml does not depend on ray with extras"
    extras = {e.strip() for e in re.match(r"ray\[([^\]]*)\]", ray_reqs[0]).group(1).split(",")}
    assert "default" in extras, (
        f"{ray_reqs[0]!r} lacks Ray's 'default' extra: without it `ray start --include-dashboard=true` fails on the "
        "GPU box and `ray job submit` has nothing to talk to; use ray[default,...] and run `uv lock`"
    )
