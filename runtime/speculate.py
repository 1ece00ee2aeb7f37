"""Prompt-lookup speculative decoding: drafts from the context itself, verified in one forward.

The draft is what followed the most recent earlier occurrence of the context's last n-gram
(longest n first) in the prompt and the text generated so far: answers that quote or edit
their prompt (summaries, code, chat over a document) repeat long spans of it. A decode step
reads every weight once however many positions it computes, so on a bandwidth-bound device
verifying k drafts in one forward of k + 1 positions costs about one step.

Verification keeps the output distribution. Greedy accepts a draft iff it is the argmax, so
the tokens are those of plain greedy decoding wherever a forward of k + 1 positions computes
what k + 1 single steps do (on int8-activation artifacts the two differ by rounding, and a
near-tie can go the other way: README). Sampling uses the standard rule for a
deterministic draft (q = one-hot): accept draft d with probability p(d), else draw from p with
d removed and renormalised; the text differs from plain sampling with the same seed (the
random stream is consumed differently), its distribution does not. The static cache is written
by position and every backend reads only the slots below its position, so a rejected draft
costs no copy: the position moves back (``Backend.rewind``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_NGRAM = 3
MIN_NGRAM = 2  # a single recurring token predicts the next one too poorly to pay for its verification


@dataclass
class SpeculationStats:
    """Counts, and the draft length schedule: a forward of k + 1 positions costs more than one
    of a single position on a CPU (2x for k = 3 measured on SmolLM2's artifacts), so the length
    grows by 2 after a fully accepted draft and shrinks by 1 after a rejection, between 1 and k
    (the schedule of Hugging Face's assisted generation)."""

    k: int  # most drafts verified per forward
    drafted: int = 0
    accepted: int = 0
    forwards: int = 0  # verification forwards (each k + 1 positions at most)
    length: int = 0  # the current draft length

    def __post_init__(self):
        self.length = self.length or self.k

    def update(self, n_drafted: int, n_accepted: int) -> None:
        self.forwards += 1
        self.drafted += n_drafted
        self.accepted += n_accepted
        self.length = min(self.k, self.length + 2) if n_accepted == n_drafted else max(1, self.length - 1)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")

    def to_dict(self) -> dict:
        return {"k": self.k, "drafted": self.drafted, "accepted": self.accepted, "forwards": self.forwards,
                "acceptance_rate": self.acceptance_rate}


def draft(context: list[int], k: int, max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM) -> list[int]:
    """Up to ``k`` tokens that followed the latest earlier occurrence of the context's last
    n-gram, for n from ``max_ngram`` down to ``min_ngram``; [] when none recurs."""
    if k < 1 or len(context) <= min_ngram:
        return []
    arr = np.asarray(context, dtype=np.int64)
    for n in range(min(max_ngram, len(arr) - 1), min_ngram - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(arr[:-1], n)  # every n-gram but the tail itself
        hits = np.flatnonzero((windows == arr[-n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return [int(t) for t in arr[start:start + k]]
    return []


def verify(probs: np.ndarray | None, greedy_choice: int, proposed: int,
           rng: np.random.Generator) -> tuple[bool, int]:
    """(accepted, token). Greedy (``probs`` None): accepted iff ``proposed`` is the
    choice, else the choice. Sampling: accepted with probability p(proposed), else a draw from
    p without ``proposed``."""
    if probs is None:
        return greedy_choice == proposed, greedy_choice
    p = probs
    if rng.random() < p[proposed]:
        return True, proposed
    rest = p.copy()
    rest[proposed] = 0.0
    total = rest.sum()
    if total <= 0:  # p was one-hot on the draft: it is always accepted above
        return True, proposed
    return False, int(rng.choice(rest.size, p=rest / total))
