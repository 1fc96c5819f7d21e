"""The training loop (``Trainer``) and held-out evaluation (``Evaluator``).

This file imports nothing: importing ``fsdp_kit.training.config`` (what composing a config does) must not import
torch or transformers. Import from the modules: trainer (Trainer, TrainParts, FitResult), evaluator, batch_size,
profiler, watchdog, nonfinite; config is light.
"""
