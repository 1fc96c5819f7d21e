"""Data: deterministic built-in task, wikihow CSV/JSONL, padding never in the loss, per-rank slices."""

from __future__ import annotations

import itertools

import pytest
from helpers import job
from transformers import GPT2Config, T5Config

from fsdp_kit.data import builtin
from fsdp_kit.data.loader import GlobalBatchSampler, build
from fsdp_kit.errors import ConfigError
from fsdp_kit.models.objective import IGNORE_INDEX

T5 = T5Config(vocab_size=384, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def test_builtin_task_is_deterministic_and_train_eval_are_disjoint():
    assert builtin.pairs(0, 0, 5) == builtin.pairs(0, 0, 5)
    assert builtin.pairs(0, 0, 5) != builtin.pairs(1, 0, 5)
    source, target = builtin.example(0, 3)
    words = source.removeprefix(builtin.PREFIX).split()
    assert target == "".join(sorted({str(builtin.WORDS.index(w)) for w in words}))
    train = set(builtin.pairs(0, 0, 2000))
    held_out = builtin.pairs(0, 2000, 200)
    assert sum(pair in train for pair in held_out) < 20  # same strings can recur by chance, never by index


def test_labels_pad_with_minus_100_and_decoder_inputs_shift_right(tmp_path):
    bundle = build(job(tmp_path).data, T5)
    batch = bundle.collate([bundle.train[i] for i in range(4)])
    labels, decoder_inputs = batch["labels"], batch["decoder_input_ids"]
    assert (labels == IGNORE_INDEX).any(), "fixed-length batches must contain padding for this check"
    assert (labels != T5.pad_token_id).all(), "padding never appears as a target"
    assert (decoder_inputs[:, 0] == T5.decoder_start_token_id).all()
    shifted = labels[:, :-1].masked_fill(labels[:, :-1] == IGNORE_INDEX, T5.pad_token_id)
    assert (decoder_inputs[:, 1:] == shifted).all()
    assert batch["attention_mask"].sum() == sum(len(bundle.train[i]["source"]) for i in range(4))


def test_decoder_only_batches_mask_the_prompt(tmp_path):
    config = GPT2Config(vocab_size=384, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    bundle = build(job(tmp_path, "model=gpt2_tiny").data, config)
    example = bundle.train[0]
    batch = bundle.collate([example])
    labels = batch["labels"][0]
    assert (labels[: len(example["source"])] == IGNORE_INDEX).all()
    assert labels[len(example["source"]): len(example["source"]) + len(example["target"])].tolist() == example["target"]
    prompts = bundle.collate.prompts([bundle.train[0], bundle.train[1]], device="cpu")
    assert (prompts["input_ids"][:, -1] == 1).all(), "decoder-only prompts are left-padded, ending in the source"


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_together_see_exactly_the_single_process_global_batch(world):
    single = GlobalBatchSampler(50, 8, rank=0, world_size=1, seed=3)
    ranks = [GlobalBatchSampler(50, 8 // world, rank=r, world_size=world, seed=3) for r in range(world)]
    for global_batch, *slices in itertools.islice(zip(single, *ranks), 20):  # crosses several epochs
        assert list(itertools.chain(*slices)) == global_batch


def test_sampler_resumes_at_a_sample_offset_at_any_world_size():
    stream = list(itertools.islice(GlobalBatchSampler(30, 4, 0, 1, seed=1), 10))
    flat = list(itertools.chain(*stream))
    resumed = GlobalBatchSampler(30, 2, rank=1, world_size=2, seed=1, start_sample=12)
    assert next(iter(resumed)) == flat[14:16]


def test_wikihow_csv_with_multiline_quoted_articles(tmp_path):
    path = tmp_path / "wikihowAll.csv"
    rows = ['headline,title,text']
    rows += [f'"Step {i}.\nDo it.","How to {i}","Line one of {i}.\nLine two, with a comma."' for i in range(40)]
    rows.append('"",How to skip,"an empty headline is skipped"')
    path.write_text("\n".join(rows) + "\n")
    cfg = job(tmp_path, "data=csv", f"data.path={path}", "data.eval_examples=8", "data.max_skipped_fraction=0.05").data
    bundle = build(cfg, T5)
    assert len(bundle.train) == 32 and len(bundle.eval) == 8
    assert bundle.eval_pairs[-1] == ("Line one of 39.\nLine two, with a comma.", "Step 39.\nDo it.")
    # Each row spans 3 lines after the header: the skipped 41st row starts on line 2 + 3 * 40.
    assert bundle.report[1] == ("data eval: 9 rows read from wikihowAll.csv, 8 kept, 1 skipped "
                                "('headline' is empty: 1, line 122)")
    with pytest.raises(ConfigError, match=r"1 of 41 rows would be skipped .* line 122"):
        build(job(tmp_path, "data=csv", f"data.path={path}", "data.eval_examples=8").data, T5)


def test_any_two_named_jsonl_fields(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(f'{{"question": "q{i}", "answer": "a{i}"}}' for i in range(20)))
    cfg = job(tmp_path, "data=jsonl", f"data.path={path}", "data.source_column=question",
              "data.target_column=answer", "data.eval_examples=4").data
    bundle = build(cfg, T5)
    assert bundle.eval_pairs == [(f"q{i}", f"a{i}") for i in range(16, 20)]


def test_synthetic_data_has_fixed_shapes(tmp_path):
    cfg = job(tmp_path, "data=synthetic", "data.max_source_len=32", "data.max_target_len=8").data
    batch = build(cfg, T5).collate([build(cfg, T5).train[i] for i in range(3)])
    assert batch["input_ids"].shape == (3, 32) and batch["labels"].shape == (3, 8)
    assert int(batch["input_ids"].max()) < T5.vocab_size
