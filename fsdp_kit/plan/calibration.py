"""How fast a GPU runs the work of plan/work.py: four efficiencies, fitted to measured steps.

    step compute time = matmul and attention FLOPs / (matmul_efficiency x dense peak of the compute dtype)
                      + bytes of the memory-bound ops / (memory_efficiency x HBM bandwidth)
                      + kernels x seconds_per_kernel (launch and dispatch gaps of eager execution)

fp32 compute uses the fp32 peak and its own efficiency. The shipped values (calibration.json) are a least-squares
fit of the relative step-time error over the GPU runs on record (benchmarks/plan_vs_measured.py --fit writes them,
with the records it used); they are effective values of eager PyTorch on those runs, not kernel benchmarks.
"""

from __future__ import annotations

import functools
import itertools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

CALIBRATION_FILE = Path(__file__).with_name("calibration.json")


@dataclass(frozen=True)
class Calibration:
    matmul_efficiency: float
    """Achieved fraction of the dense bf16/fp16 peak on matmuls and fused attention."""
    fp32_matmul_efficiency: float
    """Achieved fraction of the fp32 peak (precision=fp32; TF32 off, torch's default)."""
    memory_efficiency: float
    """Achieved fraction of HBM bandwidth on the memory-bound ops."""
    seconds_per_kernel: float
    """Host time per kernel that the GPU waits for."""
    fitted_on: tuple[str, ...] = field(default=())
    """The measurements the values were fitted to (file and label)."""

    def describe(self) -> str:
        return (
            f"{self.matmul_efficiency:.0%} of peak on matmuls (fp32 {self.fp32_matmul_efficiency:.0%}), "
            f"{self.memory_efficiency:.0%} of HBM bandwidth, {1e6 * self.seconds_per_kernel:.0f} us per kernel; "
            f"fitted to {len(self.fitted_on)} GPU runs"
        )


def load(path: Path = CALIBRATION_FILE) -> Calibration:
    data = json.loads(path.read_text())
    return Calibration(**{**data["calibration"], "fitted_on": tuple(data["calibration"].get("fitted_on", ()))})


@functools.cache
def shipped() -> Calibration:
    """The calibration shipped with fsdp_kit (calibration.json beside this module)."""
    return load()


def save(calibration: Calibration, path: Path = CALIBRATION_FILE, **provenance: object) -> None:
    path.write_text(json.dumps({"provenance": provenance, "calibration": asdict(calibration)}, indent=2) + "\n")


@dataclass(frozen=True)
class Observation:
    """One measured step, as the four terms of the time model before their efficiencies are applied."""

    bf16_matmul_s: float
    """Matmul + attention FLOPs / bf16 peak (0 for fp32 runs)."""
    fp32_matmul_s: float
    memory_s: float
    """Bytes / HBM bandwidth."""
    kernels: float
    measured_s: float
    label: str = ""

    def terms(self) -> list[float]:
        return [self.bf16_matmul_s, self.fp32_matmul_s, self.memory_s, self.kernels]


def _as_calibration(theta: list[float], default: Calibration, labels: tuple[str, ...]) -> Calibration:
    inverse = [theta[0], theta[1], theta[2]]
    base = [default.matmul_efficiency, default.fp32_matmul_efficiency, default.memory_efficiency]
    efficiency = [1.0 / x if x > 0 else b for x, b in zip(inverse, base, strict=True)]
    return Calibration(min(efficiency[0], 1.0), min(efficiency[1], 1.0), min(efficiency[2], 1.0), theta[3], labels)


def fit(observations: list[Observation], default: Calibration) -> Calibration:
    """Least squares of the relative error, every coefficient >= 0 (exact non-negative least squares over the
    subsets of the four terms). A term no observation exercises keeps ``default``'s value."""
    used = [i for i in range(4) if any(o.terms()[i] > 0 for o in observations)]
    if not observations or not used:
        return default
    a = torch.tensor([[o.terms()[i] / o.measured_s for i in used] for o in observations], dtype=torch.float64)
    ones = torch.ones(len(observations), 1, dtype=torch.float64)
    best: tuple[float, list[float]] | None = None
    for size in range(1, len(used) + 1):
        for subset in itertools.combinations(range(len(used)), size):
            solution = torch.linalg.lstsq(a[:, subset], ones).solution.flatten()
            if (solution < 0).any():
                continue
            residual = float(((a[:, subset] @ solution - 1.0) ** 2).sum())
            if best is None or residual < best[0] - 1e-12:
                theta = [0.0] * len(used)
                for position, value in zip(subset, solution.tolist(), strict=True):
                    theta[position] = value
                best = (residual, theta)
    full = [0.0, 0.0, 0.0, default.seconds_per_kernel]
    for position, index in enumerate(used):
        full[index] = best[1][position] if best else 0.0
    return _as_calibration(full, default, tuple(o.label for o in observations))


def predict(calibration: Calibration, observation: Observation) -> float:
    """Predicted seconds of ``observation``'s step."""
    return (
        observation.bf16_matmul_s / calibration.matmul_efficiency
        + observation.fp32_matmul_s / calibration.fp32_matmul_efficiency
        + observation.memory_s / calibration.memory_efficiency
        + observation.kernels * calibration.seconds_per_kernel
    )
