"""Validation metrics on torchmetrics: states that sum or concatenate, reduced across ranks by
torchmetrics' own sync when ``compute()`` runs in a process group.

Each task builds a :class:`TaskMetrics` (``mmdist.tasks``); :class:`EvalMetrics` holds them
with the mean validation loss and names the results: ``val_<metric>`` for one task,
``val_<task>_<metric>`` for each task of a multitask model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from sacrebleu.metrics import BLEU
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric, SumMetric
from torchmetrics.classification import BinaryAccuracy, MulticlassAccuracy
from torchmetrics.utilities import dim_zero_cat


class TaskMetrics(nn.Module):
    """The metrics of one task: fed its per-sample eval outputs, computed to named floats."""

    def update(self, outputs: dict[str, Tensor]) -> None:
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        raise NotImplementedError


class EvalMetrics(nn.Module):
    """Mean validation loss plus each task's metrics.

    Args:
        tasks: task name -> its metrics.
        prefixed: name results ``val_<task>_<metric>`` (multitask) instead of ``val_<metric>``.
    """

    def __init__(self, tasks: dict[str, TaskMetrics], prefixed: bool):
        super().__init__()
        self.loss = MeanMetric(nan_strategy="disable")
        self.tasks = nn.ModuleDict(tasks)
        self.prefixed = prefixed

    def update(self, outputs: dict[str, Tensor]) -> None:
        """Outputs of ``FusedModel.eval_outputs``: ``loss`` and ``<task>.<name>`` tensors."""
        self.loss.update(outputs["loss"].float())
        for name, metrics in self.tasks.items():
            metrics.update({k.split(".", 1)[1]: v for k, v in outputs.items()
                            if k.startswith(name + ".")})

    def compute(self) -> dict[str, float]:
        out = {"val_loss": float(self.loss.compute())}
        for name, metrics in self.tasks.items():
            values = metrics.compute()
            if self.prefixed:
                out.update({f"val_{name}_{k[4:]}": v for k, v in values.items()})
            else:
                out.update(values)
        if not self.prefixed and "val_token_loss" in out:
            out["val_loss"] = out.pop("val_token_loss")  # token-weighted, as perplexity
        return out


class PairRecall(Metric):
    """Recall@K both ways over paired unit-norm embeddings (row i of each is a pair); the
    candidates are every pair of the split, gathered from all ranks."""

    full_state_update = False

    def __init__(self, ks: tuple[int, ...] = (1, 5, 10),
                 directions: tuple[str, str] = ("t2i", "i2t")):
        super().__init__()
        self.ks = ks
        self.directions = directions
        # flat, so a rank without samples contributes an empty tensor of the same rank (1-D)
        self.add_state("text", default=[], dist_reduce_fx="cat")
        self.add_state("other", default=[], dist_reduce_fx="cat")
        self.add_state("dim", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="max")

    def update(self, text: Tensor, other: Tensor) -> None:
        self.text.append(text.float().reshape(-1))
        self.other.append(other.float().reshape(-1))
        self.dim = torch.tensor(text.shape[-1], device=self.dim.device)

    def compute(self) -> dict[str, float]:
        dim = int(self.dim)
        return retrieval_metrics(dim_zero_cat(self.text).reshape(-1, dim),
                                 dim_zero_cat(self.other).reshape(-1, dim), self.ks,
                                 self.directions)


def retrieval_metrics(text: Tensor, other: Tensor, ks: tuple[int, ...] = (1, 5, 10),
                      directions: tuple[str, str] = ("t2i", "i2t")) -> dict[str, float]:
    """Recall@K both ways for paired unit-norm embeddings (row i of each is a pair):
    ``val_r{K}_{directions[0]}`` ranks the ``other`` rows for each ``text`` row (text ->
    other), ``directions[1]`` the reverse; ``val_r1_mean`` is the mean of the two R@1."""
    sim = text @ other.t()
    target = torch.arange(sim.shape[0], device=sim.device)
    out = {}
    forward, backward = directions
    for name, s in ((forward, sim), (backward, sim.t())):
        # rank of the true pair = number of candidates scoring strictly higher
        rank = (s > s[target, target].unsqueeze(1)).sum(1)
        for k in ks:
            out[f"val_r{k}_{name}"] = float((rank < k).float().mean())
    out["val_r1_mean"] = (out[f"val_r1_{forward}"] + out[f"val_r1_{backward}"]) / 2
    return out


def content_ids(ids: Iterable[int], eos_id: int, special_ids: Iterable[int]) -> list[int]:
    """The ids of a generated or reference row that are text: cut at the first EOS, the
    tokenizer's special tokens dropped."""
    special = set(special_ids)
    out = []
    for i in ids:
        if i == eos_id:
            break
        if i not in special:
            out.append(i)
    return out


class TokenBLEU(Metric):
    """Corpus BLEU-4 (0..1: sacreBLEU's score / 100) of generated rows against their references,
    each cut at the tokenizer's EOS with its special tokens removed.

    sacreBLEU computes it (``BLEU().corpus_score``: 13a tokenisation, exponential smoothing) on
    the words of the decoded text when :attr:`words` is set (``build_metrics`` sets it from the
    run's tokenizer), else on the token ids as words. With ``effective_order`` a split whose
    sentences are all shorter than 4 words (a digit, "a red circle") is scored on the n-gram
    orders it has instead of 0; any split with a 4-gram gets the standard score. The states are
    the content ids of every row, gathered from all ranks, so the score is the corpus score of
    the whole split.

    Args:
        eos_id: the end-of-sequence id of the tokenizer in use.
        special_ids: every special-token id of that tokenizer.
    """

    full_state_update = False

    def __init__(self, eos_id: int, special_ids: Iterable[int]):
        super().__init__()
        self.eos_id, self.special_ids = int(eos_id), sorted(set(special_ids))
        # content ids -> the words of their decoded text; None: BLEU over token ids
        self.words: Callable[[list[int]], list[str]] | None = None
        # flat float32 (exact for ids below 2^24), so a rank without samples contributes an
        # empty tensor of the same dtype and rank: content ids, and each row's length
        for name in ("hyp_ids", "hyp_lens", "ref_ids", "ref_lens"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, generated: Tensor, target: Tensor) -> None:
        for ids, lens, rows in ((self.hyp_ids, self.hyp_lens, generated),
                                (self.ref_ids, self.ref_lens, target)):
            content = [content_ids(r, self.eos_id, self.special_ids) for r in rows.tolist()]
            ids.append(torch.tensor([i for c in content for i in c], dtype=torch.float32,
                                    device=self.device))
            lens.append(torch.tensor([len(c) for c in content], dtype=torch.float32,
                                     device=self.device))

    def _texts(self, ids: Any, lens: Any) -> list[str]:
        flat = dim_zero_cat(ids).long().tolist() if len(ids) else []
        out, at = [], 0
        for n in (dim_zero_cat(lens).long().tolist() if len(lens) else []):
            row = flat[at:at + n]
            at += n
            out.append(" ".join(self.words(row) if self.words is not None else map(str, row)))
        return out

    def compute(self) -> Tensor:
        hyps = self._texts(self.hyp_ids, self.hyp_lens)
        refs = self._texts(self.ref_ids, self.ref_lens)
        if not hyps:
            return torch.tensor(0.0)
        # token ids are words already; decoded text gets sacreBLEU's standard tokenisation
        bleu = BLEU(tokenize="13a" if self.words is not None else "none", effective_order=True)
        score = bleu.corpus_score(hyps, [refs]).score / 100.0
        return torch.tensor(min(score, 1.0), dtype=torch.float64)  # 100.00000000000004 / 100


def corpus_bleu(generated: Tensor, target: Tensor, eos_id: int,
                special_ids: Iterable[int]) -> float:
    """:class:`TokenBLEU` of one batch of generated rows against their references."""
    metric = TokenBLEU(eos_id, special_ids)
    metric.update(generated, target)
    return float(metric.compute())


class MatchAccuracy(TaskMetrics):
    """Accuracy of match logits: positives above 0, negatives at or below. ``val_accuracy``
    against the negatives with every other modality swapped; ``val_hard_accuracy`` against the
    hard ones (one modality swapped), when the task makes them."""

    def __init__(self, hard: bool = False):
        super().__init__()
        self.accuracy = BinaryAccuracy()
        # decided by the config, never by what a rank saw: compute() is a collective, and a
        # rank without a val batch must still join it
        self.hard = BinaryAccuracy() if hard else None

    def update(self, o: dict[str, Tensor]) -> None:
        pos = o["logit_pos"]
        for metric, neg in ((self.accuracy, o["logit_neg"]), (self.hard, o.get("logit_hard"))):
            if metric is None or neg is None:
                continue
            neg = neg.flatten()
            preds = torch.cat([pos > 0, neg > 0]).long()
            target = torch.cat([torch.ones_like(pos), torch.zeros_like(neg)]).long()
            metric.update(preds, target)

    def compute(self) -> dict[str, float]:
        out = {"val_accuracy": float(self.accuracy.compute())}
        if self.hard is not None:
            out["val_hard_accuracy"] = float(self.hard.compute())
        return out


class ClassAccuracy(TaskMetrics):
    """Accuracy of ``logits`` against ``label``, rows with label -1 left out."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.accuracy = MulticlassAccuracy(max(num_classes, 2), average="micro", ignore_index=-1)

    def update(self, o: dict[str, Tensor]) -> None:
        self.accuracy.update(o["logits"].float(), o["label"].long())

    def compute(self) -> dict[str, float]:
        return {"val_accuracy": float(self.accuracy.compute())}


class Retrieval(TaskMetrics):
    """Recall@K both ways of paired text / other embeddings (``directions``: their names)."""

    def __init__(self, directions: tuple[str, str] = ("t2i", "i2t")):
        super().__init__()
        self.recall = PairRecall(directions=directions)

    def update(self, o: dict[str, Tensor]) -> None:
        self.recall.update(o["text_emb"], o["other_emb"])

    def compute(self) -> dict[str, float]:
        return self.recall.compute()


class TextMetrics(TaskMetrics):
    """Token-weighted loss and perplexity; exact match and BLEU when asked for."""

    def __init__(self, exact_match: bool, bleu: TokenBLEU | None):
        super().__init__()
        self.nll = SumMetric(nan_strategy="disable")
        self.tokens = SumMetric(nan_strategy="disable")
        self.exact = MeanMetric(nan_strategy="disable") if exact_match else None
        self.bleu = bleu

    def update(self, o: dict[str, Tensor]) -> None:
        self.nll.update(o["nll_sum"].double())
        self.tokens.update(o["n_tokens"].double())
        if self.exact is not None:
            self.exact.update(o["exact_match"].float())
        if self.bleu is not None:
            self.bleu.update(o["generated"], o["target"])

    def compute(self) -> dict[str, float]:
        nll = float(self.nll.compute() / self.tokens.compute().clamp_min(1))
        out = {"val_token_loss": nll, "val_perplexity": math.exp(min(nll, 50.0))}
        if self.exact is not None:
            out["val_accuracy"] = float(self.exact.compute())
        if self.bleu is not None:
            out["val_bleu"] = float(self.bleu.compute())
        return out
