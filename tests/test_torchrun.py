"""2 processes started by ``torchrun`` (every rank runs run.py from the start, nothing inherited from a rank 0
process) write exactly one run directory and evaluate like the 1-process run.

torchrun starts both ranks independently; global rank 0 chooses the run directory once the process group exists
and broadcasts it (mdpl.engine.trainer.RunDirectory), so rank 1 neither makes a second ``version_<n>`` nor writes
elsewhere. Same synthetic data and lr 1e-30 premise as tests/test_ddp.py: the metrics must agree to 1e-6.
"""
from __future__ import annotations

import socket
import sys
from pathlib import Path

from test_ddp import assert_same_evaluation, data, finished_run, run_args  # noqa: F401  (data: module fixture)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_torchrun_two_processes_one_run_directory_same_metrics(data: dict, tmp_path: Path) -> None:  # noqa: F811 (pytest fixture)
    one = finished_run([sys.executable, *run_args(data, tmp_path / "one", 1)], tmp_path / "one", 1)
    # Lightning reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK; devices (num_cpu_processes) = local world size
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", *run_args(data, tmp_path / "two", 2)]
    two = finished_run(cmd, tmp_path / "two", 2)
    assert_same_evaluation(one, two)
