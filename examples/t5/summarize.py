"""Generate summaries with an exported model and score them with ROUGE (the walk-through's last step).

    fsdp-kit export outputs/.../checkpoints/step_500 exported/
    python examples/t5/summarize.py exported/ --csv data/wikihow_sample.csv --rows 64

Scores the last ``--rows`` rows of the CSV: the held-out split that ``data=csv`` with ``data.eval_examples``
set to the same number kept out of training. Needs ``pip install -e '.[rouge]'``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer


def held_out(path: Path, rows: int, source: str, target: str) -> list[tuple[str, str]]:
    csv.field_size_limit(sys.maxsize)
    with path.open(newline="", encoding="utf-8") as handle:
        pairs = [(r[source], r[target]) for r in csv.DictReader(handle) if r[source].strip() and r[target].strip()]
    return pairs[-rows:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="a folder written by fsdp-kit export")
    parser.add_argument("--csv", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--source-column", default="text")
    parser.add_argument("--target-column", default="headline")
    parser.add_argument("--prefix", default="", help="as data.source_prefix in training, e.g. 'summarize: '")
    parser.add_argument("--max-source-len", type=int, default=512)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--predictions", type=Path, help="also write source/reference/prediction as JSON Lines")
    args = parser.parse_args()
    from rouge_score import rouge_scorer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSeq2SeqLM.from_pretrained(args.model).to(device).eval()
    pairs = held_out(args.csv, args.rows, args.source_column, args.target_column)
    predictions: list[str] = []
    for start in range(0, len(pairs), args.batch_size):
        sources = [args.prefix + s for s, _ in pairs[start: start + args.batch_size]]
        batch = tokenizer(sources, return_tensors="pt", padding=True, truncation=True,
                          max_length=args.max_source_len).to(device)
        with torch.no_grad():
            output = model.generate(**batch, max_new_tokens=args.max_new_tokens, num_beams=1, do_sample=False)
        predictions += tokenizer.batch_decode(output, skip_special_tokens=True)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score(reference, prediction) for (_, reference), prediction in zip(pairs, predictions)]
    summary = {name: sum(s[name].fmeasure for s in scores) / len(scores) for name in ("rouge1", "rouge2", "rougeL")}
    print(json.dumps({"rows": len(pairs), **{k: round(v, 4) for k, v in summary.items()}}))
    if args.predictions:
        with args.predictions.open("w", encoding="utf-8") as handle:
            for (source, reference), prediction in zip(pairs, predictions):
                handle.write(json.dumps({"source": source, "reference": reference, "prediction": prediction}) + "\n")


if __name__ == "__main__":
    main()
