"""Where a run's numbers go: accelerate trackers (a built-in CSV tracker beside tensorboard, wandb, ...)."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

from accelerate.tracking import GeneralTracker

from .config import TrainConfig

__all__ = ["CSVTracker", "make_trackers", "tracker_config"]

class CSVTracker(GeneralTracker):
    """accelerate tracker writing one CSV row per logged step (no dependency beyond the standard library)."""

    name = "csv"
    requires_logging_directory = True
    main_process_only = True

    def __init__(self, run_name: str, logging_dir: str | Path):
        super().__init__()
        self.run_name = run_name
        self.path = Path(logging_dir) / run_name / "metrics.csv"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.columns: list[str] | None = None

    @property
    def tracker(self):
        return self

    def store_init_configuration(self, values: dict) -> None:
        (self.path.parent / "config.json").write_text(json.dumps(values, indent=2, default=str))

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        row = {"step": step, **values}
        if self.columns is None:
            self.columns = list(row)
            if self.path.exists() and self.path.stat().st_size:  # resumed: keep the header already written
                with open(self.path, newline="") as f:
                    self.columns = next(csv.reader(f), self.columns)
            else:
                with open(self.path, "w", newline="") as f:
                    csv.writer(f).writerow(self.columns)
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([row.get(c, "") for c in self.columns])

    def finish(self) -> None:
        pass


def make_trackers(names: list[str], logging_dir: Path) -> list:
    return [CSVTracker("ce_pretrain", logging_dir) if n == "csv" else n for n in names]


def tracker_config(cfg: TrainConfig) -> dict:
    """The run's config as trackers accept it (scalars and strings only)."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in dataclasses.asdict(cfg).items()}
