"""What every training worker needs beyond the config, resolved once by the driver."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Job:
    """One run's facts for its workers (Ray carries it as :meth:`to_dict`).

    Attributes:
        data_dir: the shard directory (manifest, tokenizer).
        train_rows: rows of the train split, for the step arithmetic.
        vocab: the tokenizer's size and special ids (``TextTokenizer.model_vocab``).
        run_name: the run (checkpoints, MLflow run name).
        storage: the run's checkpoint directory.
        tracking_uri: MLflow tracking URI of the run, None without tracking.
        mlflow_run_id: the MLflow run workers log to.
        faults: fault-injection settings for tests (``train.faults``).
        labels: the manifest's class-label summary (``shards.label_summary``), or None.
        init_dir: local copy of the ``model.init_from`` model the weights start from, or None.
        started_at: wall-clock time ``mmdist train`` started (``time.time()``), for the
            start-up report; None where nothing measures it.
        fit_at: wall-clock time the driver asked Ray Train to start (this attempt).
        driver_phases: seconds the driver spent per start-up phase before ``fit_at``.
    """

    data_dir: str
    train_rows: int
    vocab: dict[str, Any]
    run_name: str
    storage: str
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    faults: dict[str, str] = field(default_factory=dict)
    labels: dict[str, Any] | None = None
    init_dir: str | None = None
    started_at: float | None = None
    fit_at: float | None = None
    driver_phases: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Job:
        return cls(**d)
