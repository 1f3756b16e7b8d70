"""The CSV logger of a run directory that keeps what earlier processes logged there.

Lightning's CSV writer deletes ``metrics.csv`` when it starts in a folder that has one, so a resumed or requeued run
(mdpl.engine.resume: it continues in the same run directory) would lose the log of everything before the resume,
including the validation scores ``scripts/reproduce.py`` reads back. Here the new rows are appended to the file (the
header widened when new columns appear, as Lightning does within one process).
"""
from __future__ import annotations

import csv

from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment


class AppendingExperimentWriter(ExperimentWriter):
    """Lightning's writer, continuing an existing ``metrics.csv`` instead of deleting it."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = list(next(csv.reader(file), []))


class RunCSVLogger(CSVLogger):
    """``CSVLogger`` whose writer appends to the run directory's ``metrics.csv`` (see the module doc)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingExperimentWriter(log_dir=self.log_dir)
        return self._experiment
