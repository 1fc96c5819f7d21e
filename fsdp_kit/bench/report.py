"""The bench's results as JSON, a markdown table and a PNG bar chart, each saying where and how it was measured."""

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

from fsdp_kit.bench import OUTPUT_FILES, LeverResult
from fsdp_kit.metrics.peak import device_name


def provenance(overrides: list[str], steps: int) -> dict[str, Any]:
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "command": " ".join(shlex.quote(a) for a in ["fsdp-kit", *sys.argv[1:]]),
        "overrides": overrides,
        "steps": steps,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def _num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:,.{digits}g}"


def _factor(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def markdown(results: list[LeverResult], about: dict[str, Any]) -> str:
    lines = [
        f"`fsdp-kit bench` on **{about['device']}** (torch {about['torch']}, transformers "
        f"{about['transformers']}, {about['date']}); command `{about['command']}`.",
        "Each side at its own largest batch (trainer.auto_batch); TFLOPS = counted model FLOPs / synchronized "
        "step time per device. Published: the factor a publication states for the lever; probe: the ratio of our "
        "H100 probe's runs (shared/DESIGN.md section 4).",
        "",
        "| lever | off: batch / TFLOPS / tokens/s | on: batch / TFLOPS / tokens/s | gain (TFLOPS) | "
        "gain (tokens/s) | gain (text tokens/s) | published | probe (H100) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        off, on = r.off.numbers, r.on.numbers
        if r.off.error or r.on.error:
            failed = "; ".join(
                f"{side} failed: {run.error}" for side, run in (("off", r.off), ("on", r.on)) if run.error
            )
            lines.append(f"| {r.lever.name} | {failed} | | n/a | n/a | n/a | | {_factor(r.probe_factor)} |")
            continue
        published = r.lever.published
        cited = f"{published.qualifier} {published.factor:g}x" if published else "n/a"
        lines.append(
            f"| {r.lever.name} | {off['batch_size']} / {_num(off['tflops_per_gpu'])} / "
            f"{_num(off['tokens_per_s'])} | {on['batch_size']} / {_num(on['tflops_per_gpu'])} / "
            f"{_num(on['tokens_per_s'])} | {_factor(r.gain('tflops_per_gpu'))} | "
            f"{_factor(r.gain('tokens_per_s'))} | {_factor(r.gain('real_tokens_per_s'))} | {cited} | "
            f"{_factor(r.probe_factor)} |"
        )
    sources = sorted({r.lever.published.source for r in results if r.lever.published})
    lines += ["", *(f"Published: {source}." for source in sources)]
    lines += [
        "",
        *(
            f"- `{r.lever.name}`: {r.lever.what}; off `{' '.join(r.lever.off)}`, on `{' '.join(r.lever.on)}`"
            for r in results
        ),
    ]
    return "\n".join(lines) + "\n"


def chart(results: list[LeverResult], about: dict[str, Any], path: Path) -> None:
    import matplotlib  # optional to a run: matplotlib takes a second to import, only charts need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.lever.name for r in results]
    series = {
        "measured here": [r.gain("tflops_per_gpu") for r in results],
        "our H100 probe": [r.probe_factor for r in results],
        "published": [r.lever.published.factor if r.lever.published else None for r in results],
    }
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 3, 4))
    for i, (label, values) in enumerate(series.items()):
        xs = [j + (i - 1) * width for j, v in enumerate(values) if v is not None]
        ys = [v for v in values if v is not None]
        bars = ax.bar(xs, ys, width, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("TFLOPS gain, lever on / off")
    ax.set_title(
        f"fsdp-kit bench on {about['device']} ({about['date'][:10]})"
        + (" - CPU run: says nothing about GPUs" if about["device"] == "cpu" else ""),
        fontsize=9,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: list[LeverResult], about: dict[str, Any], out: Path) -> list[Path]:
    """bench.json, bench.md and bench.png in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / name for name in OUTPUT_FILES]
    paths[0].write_text(json.dumps({"provenance": about, "levers": [r.as_dict() for r in results]}, indent=1) + "\n")
    paths[1].write_text(markdown(results, about))
    chart(results, about, paths[2])
    return paths
