"""A task that is not part of mmdist, written as a user would: one file. It regresses the mean
pixel of the image from the fused vector (mean squared error, lower is better)."""

from __future__ import annotations

from torch import Tensor, nn
from torchmetrics import MeanSquaredError

from mmdist.config import Config, ModelConfig
from mmdist.models.accounting import Cost, linear_cost
from mmdist.models.fused import Encoded, FusedModel
from mmdist.models.metrics import TaskMetrics
from mmdist.models.sizes import SizeSpec
from mmdist.tasks.base import BuildContext, Task, TaskOutput


class BrightnessMetrics(TaskMetrics):
    def __init__(self):
        super().__init__()
        self.mse = MeanSquaredError()

    def update(self, o: dict[str, Tensor]) -> None:
        self.mse.update(o["pred"].float(), o["target"].float())

    def compute(self) -> dict[str, float]:
        return {"val_mse": float(self.mse.compute())}


class Brightness(Task):
    name = "brightness"
    primary_metric = "val_mse"
    mode = "min"

    def __init__(self, dim: int):
        super().__init__()
        self.head = nn.Linear(dim, 1)

    @classmethod
    def config_problems(cls, m: ModelConfig, role: str) -> list[str]:
        return [] if "image" in m.modalities else [
            f"model.modalities={m.modalities}: {role} needs 'image'"]

    @classmethod
    def build(cls, ctx: BuildContext) -> Brightness:
        return cls(ctx.dim)

    @classmethod
    def head_cost(cls, cfg: Config, spec: SizeSpec, vocab_size: int, memory_tokens: int) -> Cost:
        return linear_cost(spec.hidden, 1)

    @classmethod
    def metrics(cls, m: ModelConfig, vocab: dict) -> BrightnessMetrics:
        return BrightnessMetrics()

    def _pred(self, model: FusedModel, enc: Encoded) -> Tensor:
        return self.head(model.fuse("all", enc)[2]).squeeze(-1).float()

    def loss(self, model: FusedModel, enc: Encoded, batch: dict[str, Tensor],
             evaluating: bool) -> TaskOutput:
        pred = self._pred(model, enc)
        target = batch["image"].float().mean((1, 2, 3)).to(pred.device)
        target = target / 255 if batch["image"].dtype.is_floating_point is False else target
        per_sample = (pred - target) ** 2
        return TaskOutput(per_sample.mean(), per_sample, {"pred": pred, "target": target})

    def predict(self, model: FusedModel, enc: Encoded, batch: dict[str, Tensor],
                max_new_tokens: int, num_beams: int) -> dict[str, Tensor]:
        return {"brightness": self._pred(model, enc)}
