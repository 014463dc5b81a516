"""benchmarks/record_agreement.py's count: row i's hidden state, through the LM head, predicts token
i+1, and only answer tokens (the loss mask) count."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
from record_agreement import agreement  # noqa: E402

VOCAB = 5


def record(input_ids: list[int], predicted_next: list[int], loss_mask: list[int]) -> dict[str, torch.Tensor]:
    """A record whose hidden state at row i is the one-hot of `predicted_next[i]` (an identity LM head)."""
    return {"input_ids": torch.tensor(input_ids),
            "hidden_states": torch.nn.functional.one_hot(torch.tensor(predicted_next), VOCAB).half(),
            "loss_mask": torch.tensor(loss_mask, dtype=torch.uint8)}


def test_the_row_before_predicts_each_answer_token():
    lm_head = torch.eye(VOCAB)
    # Tokens 2, 3, 4 are the answer. Row 1 predicts 2 (right), row 2 predicts 0 (wrong), row 3
    # predicts 4 (right); row 0 predicts token 1, a prompt token, which does not count, and the
    # last row predicts past the record.
    follows = record([1, 1, 2, 3, 4], [1, 2, 0, 4, 4], [0, 0, 1, 1, 1])
    assert agreement([follows], lm_head) == (2, 3, {2: 1, 0: 1, 4: 1})
    # A hidden state aligned with its own token instead of the next one agrees nowhere.
    shifted = record([1, 1, 2, 3, 4], [1, 1, 2, 3, 4], [0, 0, 1, 1, 1])
    agreeing, answer_tokens, _ = agreement([follows, shifted], lm_head)
    assert (agreeing, answer_tokens) == (2, 6)
