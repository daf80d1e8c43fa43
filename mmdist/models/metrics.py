"""Validation metrics on torchmetrics: states that sum or concatenate, reduced across ranks by
torchmetrics' own sync when ``compute()`` runs in a process group.

Each task builds a :class:`TaskMetrics` (``mmdist.tasks``); :class:`EvalMetrics` holds them
with the mean validation loss and names the results: ``val_<metric>`` for one task,
``val_<task>_<metric>`` for each task of a multitask model.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable

import torch
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

    def __init__(self, ks: tuple[int, ...] = (1, 5, 10)):
        super().__init__()
        self.ks = ks
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
                                 dim_zero_cat(self.other).reshape(-1, dim), self.ks)


def retrieval_metrics(text: Tensor, other: Tensor, ks: tuple[int, ...] = (1, 5, 10)
                      ) -> dict[str, float]:
    """Recall@K both ways for paired unit-norm embeddings (row i of each is a pair)."""
    sim = text @ other.t()
    target = torch.arange(sim.shape[0], device=sim.device)
    out = {}
    for name, s in (("t2i", sim), ("i2t", sim.t())):
        # rank of the true pair = number of candidates scoring strictly higher
        rank = (s > s[target, target].unsqueeze(1)).sum(1)
        for k in ks:
            out[f"val_r{k}_{name}"] = float((rank < k).float().mean())
    out["val_r1_mean"] = (out["val_r1_t2i"] + out["val_r1_i2t"]) / 2
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
    """Corpus BLEU-4 (0..1) over token ids, cut at the tokenizer's EOS, its special tokens
    removed; add-one smoothing of the n-gram precisions for n > 1, so that short captions
    without a 4-gram match do not score 0.

    Args:
        eos_id: the end-of-sequence id of the tokenizer in use.
        special_ids: every special-token id of that tokenizer.
    """

    full_state_update = False

    def __init__(self, eos_id: int, special_ids: Iterable[int], max_n: int = 4):
        super().__init__()
        self.eos_id, self.special_ids, self.max_n = int(eos_id), sorted(set(special_ids)), max_n
        # content ids -> the words of their decoded text (set by build_metrics from the run's
        # tokenizer); None: BLEU over token ids
        self.words: Callable[[list[int]], list[str]] | None = None
        for name, size in (("matches", max_n), ("totals", max_n), ("hyp_len", 1), ("ref_len", 1)):
            self.add_state(name, default=torch.zeros(size, dtype=torch.float64),
                           dist_reduce_fx="sum")

    def update(self, generated: Tensor, target: Tensor) -> None:
        n_max = self.max_n
        matches, totals = [0] * n_max, [0] * n_max
        hyp_len = ref_len = 0
        for hyp, ref in zip(generated.tolist(), target.tolist()):
            h = content_ids(hyp, self.eos_id, self.special_ids)
            r = content_ids(ref, self.eos_id, self.special_ids)
            if self.words is not None:
                h, r = self.words(h), self.words(r)
            hyp_len, ref_len = hyp_len + len(h), ref_len + len(r)
            for n in range(1, n_max + 1):
                hc = Counter(tuple(h[i:i + n]) for i in range(len(h) - n + 1))
                rc = Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
                matches[n - 1] += sum(min(c, rc[g]) for g, c in hc.items())
                totals[n - 1] += max(len(h) - n + 1, 0)
        dev = self.matches.device
        self.matches += torch.tensor(matches, dtype=torch.float64, device=dev)
        self.totals += torch.tensor(totals, dtype=torch.float64, device=dev)
        self.hyp_len += hyp_len
        self.ref_len += ref_len

    def compute(self) -> Tensor:
        hyp_len, ref_len = float(self.hyp_len), float(self.ref_len)
        m, t = self.matches.tolist(), self.totals.tolist()
        if hyp_len == 0 or m[0] == 0:
            return torch.tensor(0.0)
        log_p = sum(math.log((m[n] + (n > 0)) / (t[n] + (n > 0))) for n in range(self.max_n))
        bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
        return torch.tensor(bp * math.exp(log_p / self.max_n))


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
    """Recall@K both ways of paired text / other embeddings."""

    def __init__(self):
        super().__init__()
        self.recall = PairRecall()

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
