"""Pure bf16 with AnyPrecision (Kahan) vs fp32, bf16 mixed and plain pure bf16: same model, data, seed, steps.

    python benchmarks/convergence.py                         # CPU: about 10 minutes (4 recipes x 3 seeds)
    python benchmarks/convergence.py --steps 2000 model=t5_small data.tokenizer=byt5   # longer / bigger (GPU)

Writes benchmarks/results/convergence_<device>.{json,md,png}: final eval loss, exact match, tokens/s, peak
memory per recipe, and the loss curves.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from common import compose_job, device_slug, provenance, write_json

from fsdp_kit.train import run

RECIPES = {
    "fp32 + AdamW": ["precision=fp32", "optim=adamw"],
    "bf16 mixed + AdamW": ["precision=bf16", "optim=adamw"],
    "pure bf16 + AdamW": ["precision=bf16_pure", "optim=adamw"],
    "pure bf16 + AnyPrecision (Kahan)": ["precision=bf16_pure", "optim=anyprecision"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=3, help="average over this many seeds (init and data order)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--work", type=Path, default=Path("outputs/convergence"))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every recipe")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    common = [f"trainer.max_steps={args.steps}", "trainer.log_every=10", f"trainer.eval_every={args.steps // 6}",
              "checkpoint.at_end=false", "checkpoint.resume=never", "metrics.progress=false", "model.dropout=0.0",
              "trainer.eval_batches=16"]
    rows, curves = [], {}
    for name, recipe in RECIPES.items():
        slug = "".join(c if c.isalnum() else "_" for c in name)
        finals, matches, speeds, memories = [], [], [], []
        for seed in range(args.seeds):
            job = compose_job([*common, *recipe, *args.overrides, f"trainer.seed={seed}", f"data.seed={seed}",
                               f"run_dir={args.work / slug / str(seed)}"])
            result = run(job)
            finals.append(result.evals[-1]["eval_loss"])
            matches.append(result.evals[-1].get("exact_match"))
            speeds.append(result.summary["tokens_per_s"])
            memories.append(result.summary["peak_mem_gb"])
            if seed == 0:
                curves[name] = {"train": [(r["step"], r["loss"]) for r in result.history],
                                "eval": [(e["step"], e["eval_loss"]) for e in result.evals]}
        rows.append({"recipe": name, "final_eval_loss": statistics.mean(finals), "per_seed_eval_loss": finals,
                     "exact_match": None if None in matches else statistics.mean(matches),
                     "tokens_per_s": statistics.median(speeds), "peak_mem_gb": max(memories)})
    fp32 = rows[0]["final_eval_loss"]
    for row in rows:
        row["vs_fp32"] = row["final_eval_loss"] / fp32 - 1.0
    stem = args.out / f"convergence_{device_slug()}"
    write_json(stem.with_suffix(".json"), {"provenance": provenance(), "steps": args.steps,
                                           "overrides": args.overrides, "rows": rows, "curves": curves})
    stem.with_suffix(".md").write_text(_markdown(rows, provenance(), args))
    _plot(curves, stem.with_suffix(".png"))
    print(stem.with_suffix(".md").read_text())


def _markdown(rows: list[dict], info: dict, args: argparse.Namespace) -> str:
    lines = [f"Convergence on {info['device']} ({info['cpu']}), torch {info['torch']}, transformers "
             f"{info['transformers']}, {args.steps} steps, mean of {args.seeds} seeds, {info['date']}.",
             f"Command: `{info['command']}`", "",
             "| recipe | final eval loss (mean) | vs fp32 | per seed | exact match | tokens/s | peak mem GB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        match = "n/a" if r["exact_match"] is None else f"{100 * r['exact_match']:.1f}%"
        seeds = ", ".join(f"{x:.4f}" for x in r["per_seed_eval_loss"])
        lines.append(f"| {r['recipe']} | {r['final_eval_loss']:.4f} | {100 * r['vs_fp32']:+.1f}% | {seeds} | {match} | "
                     f"{r['tokens_per_s']:,.0f} | {r['peak_mem_gb']:.2f} |")
    return "\n".join(lines) + "\n"


def _plot(curves: dict, path: Path) -> None:
    fig, (train_ax, eval_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, curve in curves.items():
        train_ax.plot(*zip(*curve["train"]), label=name)
        eval_ax.plot(*zip(*curve["eval"]), marker="o", label=name)
    for ax, title in ((train_ax, "training loss"), (eval_ax, "held-out loss")):
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    eval_ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
