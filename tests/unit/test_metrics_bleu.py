"""``val_bleu`` is sacreBLEU's corpus BLEU (0..1) of the whole split: on the decoded words with
the run's tokenizer, on token ids without; the same score gathered over ranks, one of them
without rows, as in one process."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sacrebleu.metrics import BLEU

from mmdist.models.metrics import TokenBLEU, corpus_bleu

EOS, SPECIAL = 3, range(6)
WORDS = {10: "a", 11: "red", 12: "circle", 13: "blue", 14: "square", 15: "on", 16: "white",
         17: "the", 18: "grey", 19: "paper", 20: ","}
REFS = ["a red circle on white paper", "the blue square , on grey", "a red square"]
HYPS = ["a red circle on grey paper", "the blue square on grey", "a red circle"]


def ids(text: str, width: int = 12) -> list[int]:
    """[BOS] words [EOS] [PAD]..."""
    by_word = {w: i for i, w in WORDS.items()}
    row = [2, *(by_word[w] for w in text.split()), EOS]
    return row + [0] * (width - len(row))


def words(row: list[int]) -> list[str]:
    return [WORDS[i] for i in row]


def batch(texts: list[str]) -> torch.Tensor:
    return torch.tensor([ids(t) for t in texts])


def test_the_score_is_sacrebleus_corpus_score():
    metric = TokenBLEU(EOS, SPECIAL)
    metric.words = words
    metric.update(batch(HYPS[:2]), batch(REFS[:2]))  # two updates: one corpus
    metric.update(batch(HYPS[2:]), batch(REFS[2:]))
    expected = BLEU().corpus_score(HYPS, [REFS]).score / 100
    assert 0.2 < expected < 0.9
    assert float(metric.compute()) == pytest.approx(expected, abs=1e-12)
    # without a tokenizer the ids are the words (no 13a splitting of ","): the same here
    assert corpus_bleu(batch(HYPS), batch(REFS), EOS, SPECIAL) == pytest.approx(expected)
    # an average of per-batch scores would differ: the states are the rows, not the scores
    per_batch = [BLEU().corpus_score(HYPS[i:i + 1], [REFS[i:i + 1]]).score / 100
                 for i in range(3)]
    assert abs(sum(per_batch) / 3 - expected) > 0.01


def test_eos_cuts_and_special_ids_drop():
    hyp = torch.tensor([[10, 11, 12, 0, 1, EOS, 13, 14]])  # pad/unk dropped; after EOS nothing
    ref = torch.tensor([ids("a red circle")])
    assert corpus_bleu(hyp, ref, EOS, SPECIAL) == pytest.approx(1.0)
    assert corpus_bleu(batch(["blue square"]), ref, EOS, SPECIAL) == 0.0
    assert float(TokenBLEU(EOS, SPECIAL).compute()) == 0.0  # no rows
    # a split of sentences under 4 words: scored on the orders it has (sacreBLEU's effective
    # order), as sacreBLEU scores it; a split with 4-grams is unaffected (the test above)
    short = ["a red", "blue square"]
    expected = BLEU(effective_order=True).corpus_score(["a red", "blue circle"], [short])
    got = corpus_bleu(batch(["a red", "blue circle"]), batch(short), EOS, SPECIAL)
    assert got == pytest.approx(expected.score / 100) and 0.1 < got < 0.9


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    try:
        metric = TokenBLEU(EOS, SPECIAL)
        metric.words = words
        if rank == 0:  # rank 1 saw no val rows
            metric.update(batch(HYPS), batch(REFS))
        results[rank] = float(metric.compute())
    finally:
        dist.destroy_process_group()


def test_ranks_gather_the_rows_and_a_rank_without_rows_joins():
    results = mp.Manager().dict()
    mp.start_processes(_rank, args=(_free_port(), results), nprocs=2, start_method="spawn")
    expected = BLEU().corpus_score(HYPS, [REFS]).score / 100
    assert results[0] == pytest.approx(expected) and results[1] == pytest.approx(expected)
