"""Validation metrics from per-sample model outputs gathered over all batches and ranks.

``compute_metrics(task, outputs)`` reads what :meth:`FusedModel.eval_outputs` returns
(``loss`` plus ``<task>.<name>`` tensors, first dim = samples) and gives ``val_loss`` and the
task's metrics: itm ``val_accuracy``; contrastive ``val_r{1,5,10}_{t2i,i2t}`` and
``val_r1_mean``; classify / vqa ``val_accuracy``; lm ``val_perplexity`` and ``val_bleu``;
multitask each task's metrics as ``val_<task>_<metric>``.
"""

from __future__ import annotations

import math
from collections import Counter

import torch
from torch import Tensor

N_SPECIAL = 6  # ids of mmdist's special tokens ([PAD] [UNK] [BOS] [EOS] [SEP] [MASK])
EOS_ID = 3


def compute_metrics(task: str, outputs: dict[str, Tensor]) -> dict[str, float]:
    """Metrics of one task (or of each task of a multitask model) from per-sample outputs.

    Args:
        task: ``cfg.model.task``.
        outputs: concatenated :meth:`FusedModel.eval_outputs`.
    """
    if not outputs:
        return {}
    metrics = {"val_loss": float(outputs["loss"].float().mean())}
    tasks = sorted({k.split(".", 1)[0] for k in outputs if "." in k})
    for t in tasks:
        sub = {k.split(".", 1)[1]: v for k, v in outputs.items() if k.startswith(t + ".")}
        m = _task_metrics(t, sub)
        if task == "multitask":
            metrics.update({f"val_{t}_{k[4:]}": v for k, v in m.items()})
        else:
            metrics.update(m)
    if task != "multitask" and "val_token_loss" in metrics:
        metrics["val_loss"] = metrics.pop("val_token_loss")  # token-weighted, as perplexity
    return metrics


def _task_metrics(task: str, o: dict[str, Tensor]) -> dict[str, float]:
    if "logit_pos" in o:  # itm
        correct = torch.cat([o["logit_pos"] > 0, o["logit_neg"] <= 0]).float()
        return {"val_accuracy": float(correct.mean())}
    if "text_emb" in o:  # contrastive
        return retrieval_metrics(o["text_emb"].float(), o["other_emb"].float())
    if "logits" in o:  # classify / vqa classification
        valid = o["label"] >= 0
        acc = (o["logits"].argmax(-1) == o["label"])[valid].float()
        return {"val_accuracy": float(acc.mean()) if acc.numel() else float("nan")}
    if "nll_sum" in o:  # lm / vqa generation
        nll = float(o["nll_sum"].double().sum() / o["n_tokens"].double().sum().clamp_min(1))
        out = {"val_token_loss": nll, "val_perplexity": math.exp(min(nll, 50.0))}
        if task == "vqa":
            out["val_accuracy"] = float(o["exact_match"].float().mean())
        if "generated" in o:
            out["val_bleu"] = corpus_bleu(o["generated"], o["target"])
        return out
    return {}


def retrieval_metrics(text: Tensor, other: Tensor, ks: tuple[int, ...] = (1, 5, 10)
                      ) -> dict[str, float]:
    """Recall@K both ways for paired unit-norm embeddings (row i of each is a pair)."""
    sim = text @ other.t()
    n = sim.shape[0]
    target = torch.arange(n)
    out = {}
    for name, s in (("t2i", sim), ("i2t", sim.t())):
        # rank of the true pair = number of candidates scoring strictly higher
        true = s[target, target].unsqueeze(1)
        rank = (s > true).sum(1)
        for k in ks:
            out[f"val_r{k}_{name}"] = float((rank < k).float().mean())
    out["val_r1_mean"] = (out["val_r1_t2i"] + out["val_r1_i2t"]) / 2
    return out


def _strip(ids: list[int]) -> list[int]:
    out = []
    for i in ids:
        if i == EOS_ID:
            break
        if i >= N_SPECIAL:
            out.append(i)
    return out


def corpus_bleu(generated: Tensor, target: Tensor, max_n: int = 4) -> float:
    """Corpus BLEU-4 (0..1) over token ids, specials removed, cut at EOS; add-one smoothing of
    the n-gram precisions for n > 1 so short captions do not score 0."""
    matches, totals = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for hyp, ref in zip(generated.tolist(), target.tolist()):
        h, r = _strip(hyp), _strip(ref)
        hyp_len, ref_len = hyp_len + len(h), ref_len + len(r)
        for n in range(1, max_n + 1):
            hc = Counter(tuple(h[i:i + n]) for i in range(len(h) - n + 1))
            rc = Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
            matches[n - 1] += sum(min(c, rc[g]) for g, c in hc.items())
            totals[n - 1] += max(len(h) - n + 1, 0)
    if hyp_len == 0 or matches[0] == 0:
        return 0.0
    log_p = 0.0
    for n in range(max_n):
        m, t = (matches[n], totals[n]) if n == 0 else (matches[n] + 1, totals[n] + 1)
        log_p += math.log(m / t) / max_n
    bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return bp * math.exp(log_p)
