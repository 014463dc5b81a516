"""Do a target's training records carry its own behaviour? For each record set a draft trains on,
how often the target's greedy next token, read from the recorded hidden state at row i, is the
recorded answer token x_(i+1), and which tokens it predicts most often there.

    python benchmarks/record_agreement.py --records DIR --target DIR   # DIR: build's work directory

The regime experiment's drafts learn to predict the target from these hidden states
(vispec_vllm/demo/build.py): on `generated` records (the target's own answers) the target's
prediction is the answer token by construction; on `text` (reference descriptions after a text-only
prompt) and `captions` (short captions of training images) it is whatever the target makes of
them. A record set on which the target rarely predicts the answer teaches a draft hidden states the
target does not produce when it answers an image. Writes benchmarks/results/record_agreement.json.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch
from common import RESULTS, machine_description, write_json

RECORD_SETS = ("generated", "text", "captions")


def agreement(records: list[dict], lm_head: torch.Tensor) -> tuple[int, int, Counter[int]]:
    """(answer tokens the target predicts from the row before, answer tokens, its predictions there):
    row i's hidden state predicts token i+1, and an answer token is one the loss mask marks."""
    agreeing = answer_tokens = 0
    predicted: Counter[int] = Counter()
    for record in records:
        answer = record["loss_mask"][1:].bool()
        prediction = (record["hidden_states"][:-1].float() @ lm_head.T).argmax(-1)[answer]
        agreeing += (prediction == record["input_ids"][1:][answer]).sum().item()
        answer_tokens += int(answer.sum())
        predicted.update(prediction.tolist())
    return agreeing, answer_tokens, predicted


def main() -> None:
    from transformers import AutoTokenizer

    from vispec_vllm.target_checkpoint import TargetCheckpoint
    from vispec_vllm.training.data import load_records

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=Path, required=True, help="the directory holding records-<set>/")
    parser.add_argument("--target", type=Path, required=True, help="the target the records were made with")
    parser.add_argument("--num-records", type=int, default=48)
    parser.add_argument("--out", type=Path, default=RESULTS / "record_agreement.json")
    args = parser.parse_args()

    target = TargetCheckpoint.read(args.target)
    lm_head = target.lm_head().float()
    tokenizer = AutoTokenizer.from_pretrained(args.target)
    sets = {}
    for name in RECORD_SETS:
        records = load_records(args.records / f"records-{name}")[: args.num_records]
        agreeing, answer_tokens, predicted = agreement(records, lm_head)
        sets[name] = {
            "records": len(records),
            "answer_tokens": answer_tokens,
            "target_predicts_answer_token": agreeing / answer_tokens,
            "most_predicted": [{"token": tokenizer.convert_ids_to_tokens(token), "share": count / answer_tokens}
                               for token, count in predicted.most_common(3)],
        }
        print(f"{name:10s} target predicts the answer token at {agreeing / answer_tokens:.3f} of "
              f"{answer_tokens} answer tokens; most predicted: {sets[name]['most_predicted'][0]}")
    write_json({"machine": machine_description(), "target": str(args.target), "records": str(args.records),
                "command": "python benchmarks/record_agreement.py " + " ".join(sys.argv[1:]),
                "method": "greedy next token of lm_head(recorded hidden state at row i) against the recorded "
                          "token x_(i+1), over the answer tokens (loss mask) of the first records of each set",
                "sets": sets}, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
