"""Records what a ViSpec proposer sees and proposes inside a running in-process vLLM engine."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ProposalStep:
    last_row: int  # p: the draft has rows 0..p (pairing h_p with the newly committed x_{p+1})
    next_token: int
    proposals: list[int]


@dataclass
class ProposalRecorder:
    """Wraps `drafter.propose` of one engine (batch size 1) while active."""

    drafter: object
    steps: list[ProposalStep] = field(default_factory=list)
    target_hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    images: dict[str, tuple[int, int, torch.Tensor]] = field(default_factory=dict)

    def __enter__(self) -> ProposalRecorder:
        original = type(self.drafter).propose
        runner = self.drafter.runner

        def propose(**kwargs):
            cad = kwargs["common_attn_metadata"]
            assert cad.num_reqs == 1, "the recorder follows one request"
            rows = kwargs["target_hidden_states"].shape[0]
            for pos, h in zip(runner.positions[:rows].tolist(), kwargs["target_hidden_states"], strict=True):
                self.target_hidden[pos] = h.detach().float().cpu().clone()
            request = runner.requests[runner.input_batch.req_ids[0]]
            for feature in request.mm_features:
                if feature.identifier not in self.images and feature.identifier in runner.encoder_cache:
                    embeds = runner.encoder_cache[feature.identifier].detach().float().cpu().clone()
                    self.images[feature.identifier] = (feature.mm_position.offset, feature.mm_position.length, embeds)
            rejected = kwargs["num_rejected_tokens_gpu"]
            last_row = int(cad.seq_lens[0]) - (0 if rejected is None else int(rejected[0])) - 1
            drafts = original(self.drafter, **kwargs)
            self.steps.append(ProposalStep(last_row, int(kwargs["next_token_ids"][0]), drafts[0].tolist()))
            return drafts

        self.drafter.propose = propose
        return self

    def __exit__(self, *exc) -> None:
        del self.drafter.propose


def record_proposals(llm, conversation: list[dict], max_tokens: int = 24) -> tuple[ProposalRecorder, list[int]]:
    """Generate greedily for one conversation; returns the recorder and prompt+output token ids."""
    from conftest import greedy, model_runner_of

    drafter = model_runner_of(llm).drafter
    llm.reset_prefix_cache()  # the recorder needs every prompt row computed in this run
    with ProposalRecorder(drafter) as recorder:
        out = llm.chat([conversation], greedy(max_tokens))[0]
    return recorder, list(out.prompt_token_ids) + list(out.outputs[0].token_ids)
