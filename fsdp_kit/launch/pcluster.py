"""Check a ParallelCluster YAML offline with aws-parallelcluster's own schema and validators (the [aws] extra).

Runs without AWS credentials or network: the schema load and the validators below make no AWS call (a
CapacityReservationTarget would, so the shipped files have none).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from fsdp_kit.errors import ConfigError, first_line

PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def fill_placeholders(text: str, values: dict[str, str]) -> str:
    return PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), text)


def read_cluster_file(path: Path) -> str:
    """The text of a ParallelCluster file; one ConfigError for a missing or non-UTF-8 file."""
    if not path.is_file():
        raise ConfigError(f"{path} does not exist", "pass the path of a ParallelCluster YAML file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = err.object[: err.start].count(b"\n") + 1
        raise ConfigError(
            f"{path} is not UTF-8 text (byte {err.object[err.start]:#04x} on line {line})",
            "save the file as UTF-8 (a ParallelCluster YAML is plain text)",
        ) from err


def _check_yaml(text: str, name: str) -> str:
    """``text`` parses as a YAML mapping without duplicate keys (ParallelCluster's own loader); else one
    ConfigError naming the line, where ``parse_config`` would log and chain three tracebacks."""
    import yaml  # late: with the [aws] extra's loader below
    from pcluster.utils import yaml_load

    try:
        tree = yaml_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or first_line(err)
        raise ConfigError(
            f"{name} is not valid YAML{where}: {problem}", "fix the YAML there (indentation, brackets, quotes)"
        ) from err
    if not isinstance(tree, dict):
        raise ConfigError(
            f"{name} holds a YAML {type(tree).__name__}, not a ParallelCluster configuration",
            "start from parallelcluster/cluster.yaml (Region:, Image:, HeadNode:, Scheduling:)",
        )
    return text


def check_cluster_yaml(text: str, cluster_name: str = "fsdp-kit", name: str = "the file") -> list[str]:
    """Raise ConfigError for unreplaced placeholders, schema errors and failed validators; return warnings."""
    left = sorted(set(PLACEHOLDER.findall(text)))
    if left:
        raise ConfigError(
            f"unreplaced placeholder(s) {', '.join('${' + name + '}' for name in left)}",
            "fill them in (envsubst < cluster.yaml > my-cluster.yaml) or pass --set NAME=value",
        )
    try:
        from marshmallow import ValidationError  # the [aws] extra (aws-parallelcluster, ~184 MB)
        from pcluster.models.common import parse_config
        from pcluster.validators.cluster_validators import (
            ComputeResourceSizeValidator,
            EfaPlacementGroupValidator,
            NameValidator,
        )
        from pcluster.validators.common import FailureLevel  # the [aws] extra
    except ImportError as err:
        raise ConfigError(
            "checking a ParallelCluster file needs aws-parallelcluster", "pip install -e '.[aws]'"
        ) from err
    config_dict = parse_config(_check_yaml(text, name))
    os.environ.setdefault("AWS_DEFAULT_REGION", str(config_dict.get("Region") or "us-east-1"))
    from pcluster.schemas.cluster_schema import ClusterSchema  # the [aws] extra

    try:
        config = ClusterSchema(cluster_name=cluster_name).load(config_dict)
    except ValidationError as err:
        raise ConfigError(
            f"ParallelCluster schema rejects the file: {err.messages}",
            "fix the named keys (see the ParallelCluster 3 configuration reference)",
        ) from err
    failures = []
    for queue in config.scheduling.queues:
        # queue.multi_az_enabled asks EC2 for the subnets' zones; offline, more than one subnet counts as multi-AZ.
        multi_az = len(set(queue.networking.subnet_ids)) > 1
        failures += NameValidator().execute(name=queue.name)
        for resource in queue.compute_resources:
            failures += ComputeResourceSizeValidator().execute(
                min_count=resource.min_count, max_count=resource.max_count, capacity_type=queue.capacity_type
            )
            chosen = queue.get_chosen_placement_group_setting_for_compute_resource(resource)
            failures += EfaPlacementGroupValidator().execute(
                efa_enabled=resource.efa.enabled,
                placement_group_key=queue.get_placement_group_settings_for_compute_resource(resource).get("key"),
                placement_group_disabled=chosen.enabled is False,
                multi_az_enabled=multi_az,
                capacity_type=queue.capacity_type,
                queue_name=queue.name,
            )
    errors = [f.message for f in failures if f.level == FailureLevel.ERROR]
    if errors:
        raise ConfigError("ParallelCluster validators failed: " + " | ".join(errors), "fix the named settings")
    return [f.message for f in failures]
