"""Test-only fault injection for the multi-node Slurm tests (tests/test_slurm.py): a job whose ``slurm.setup`` puts
this folder on PYTHONPATH loads it in every Python process, and the environment (sbatch passes the submitter's on)
says what to break: ``FSDP_KIT_TEST_FAULT=<kill|hang>:<rank>:<step>:<once file>``.

At the start of training step <step>, the trainer of global rank <rank> SIGKILLs itself (what the OOM killer or a
GPU fault does) or sleeps (a hung kernel, for the hang watchdog to find), once: it creates <once file> first, so the
restarted workers train on.
"""

import os

_SPEC = os.environ.get("FSDP_KIT_TEST_FAULT", "")
if _SPEC and os.environ.get("TORCHELASTIC_RUN_ID") and "RANK" in os.environ:  # a trainer under torchrun
    _KIND, _RANK, _STEP, _ONCE = _SPEC.split(":", 3)
    if int(os.environ["RANK"]) == int(_RANK) and not os.path.exists(_ONCE):
        import signal
        import time

        from fsdp_kit.training.trainer import Trainer

        _original = Trainer._train_step

        def _faulty_train_step(self, micro_batches):
            if self.state.step + 1 == int(_STEP) and not os.path.exists(_ONCE):
                open(_ONCE, "w").close()
                if _KIND == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(600)
            return _original(self, micro_batches)

        Trainer._train_step = _faulty_train_step
