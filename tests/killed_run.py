"""``python tests/killed_run.py with ...``: ``run.py`` that SIGKILLs itself at a chosen point (tests only).

With ``MDPL_TEST_KILL_AFTER_STEP=K`` every process of the run (its process group: DDP ranks included) is
killed with SIGKILL at the start of the first training batch after optimizer step K. Every checkpoint that
step K (or the validation after it) writes is complete on disk by then (Lightning saves them before the next
batch starts, and under DDP all ranks wait for rank 0's write), so a test knows exactly which state survives
the kill, on any machine, however loaded. Without the variable this is plain ``run.py``.
With ``MDPL_TEST_SIGNAL_BEFORE_KILL=SIGUSR1`` the process first raises that signal (SLURM's requeue warning): its
handler (Lightning's SLURM auto-requeue: ``hpc_ckpt_<n>.ckpt``, ``scontrol requeue``) has run when the kill comes.

Start it in a new session (``start_new_session=True``) so that the kill reaches only the run's processes.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

KILL_ENV = "MDPL_TEST_KILL_AFTER_STEP"
SIGNAL_ENV = "MDPL_TEST_SIGNAL_BEFORE_KILL"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pytorch_lightning as pl  # noqa: E402

import mdpl.engine.trainer as trainer_module  # noqa: E402


class KillAfterStep(pl.Callback):
    """SIGKILL the process group at the first training batch that starts after optimizer step ``step``."""

    def __init__(self, step: int, before: str = "") -> None:
        self.step = step
        self.before = signal.Signals[before] if before else None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step >= self.step:
            if self.before is not None:
                signal.raise_signal(self.before)   # returns after the Python-level handler has run
            os.killpg(os.getpgid(0), signal.SIGKILL)


def _with_kill(build_callbacks):
    def build(*args, **kwargs):
        return [*build_callbacks(*args, **kwargs),
                KillAfterStep(int(os.environ[KILL_ENV]), os.environ.get(SIGNAL_ENV, ""))]
    return build


if __name__ == "__main__":
    if os.environ.get(KILL_ENV):
        trainer_module.build_callbacks = _with_kill(trainer_module.build_callbacks)
    from run import ex
    ex.run_commandline(sys.argv)
