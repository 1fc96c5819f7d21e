"""Provenance and composition helpers shared by the benchmarks: every result file says what made it."""

from __future__ import annotations

import datetime
import json
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

import torch
import transformers

from fsdp_kit.config import compose_job
from fsdp_kit.metrics.peak import device_name

__all__ = ["compose_job", "device_slug", "provenance", "write_json"]


def provenance() -> dict[str, Any]:
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return {
        "device": device_name(device),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def device_slug() -> str:
    name = provenance()["device"]
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
