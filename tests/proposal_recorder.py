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


@dataclass
class RequestDrafts:
    """One request's drafting in a run, as vLLM's runner and `propose` see it (nothing of the plugin's)."""

    image_spans: list[tuple[int, int]]  # token positions [offset, offset + length) of each image
    # Sequence length (prompt + committed tokens, the token sampled this step included) -> the
    # proposals made there; a list, so that a state proposed at twice shows up.
    drafts: dict[int, list[list[int]]] = field(default_factory=dict)
    windows: list[tuple[int, int, bool]] = field(default_factory=list)  # (start, end, sampled) per step
    resumed: bool = False  # recomputed from scratch after a preemption
    after_resume: set[int] = field(default_factory=set)  # states proposed at after the recompute

    def splits_an_image(self) -> bool:
        """A step ended inside an image's tokens (chunked prefill split it)."""
        return any(offset < end < offset + length for start, end, _ in self.windows
                   for offset, length in self.image_spans)


@dataclass
class BatchProposalRecorder:
    """Wraps `drafter.propose` of one engine while active; keys requests by prompt token ids and images.

    Only proposals the engine can use are kept: a request still in a partial prefill step samples
    nothing (vLLM's `discard_request_mask`), and its draft row is thrown away by vLLM."""

    runner: object  # vLLM's model runner (conftest.model_runner_of)
    num_speculative_tokens: int
    requests: dict[tuple, RequestDrafts] = field(default_factory=dict)
    batch_sizes: list[int] = field(default_factory=list)  # requests in each propose() call

    def __enter__(self) -> BatchProposalRecorder:
        runner, drafter = self.runner, self.runner.drafter
        original = type(drafter).propose

        def propose(**kwargs):
            cad = kwargs["common_attn_metadata"]
            num_reqs = cad.num_reqs
            query_start = cad.query_start_loc_cpu[: num_reqs + 1].tolist()
            seq_lens = cad.seq_lens[:num_reqs].tolist()
            rejected = kwargs["num_rejected_tokens_gpu"]
            rejected = [0] * num_reqs if rejected is None else rejected[:num_reqs].tolist()
            discarded = runner.discard_request_mask.np[:num_reqs].tolist()
            drafts = original(drafter, **kwargs)
            self.batch_sizes.append(num_reqs)
            for i, req_id in enumerate(runner.input_batch.req_ids[:num_reqs]):
                request = runner.requests[req_id]
                # Image prompts of one family differ only in their images: their hashes join the key.
                key = (*request.prompt_token_ids, *(f.identifier for f in request.mm_features))
                record = self.requests.get(key)
                if record is None:
                    spans = [(f.mm_position.offset, f.mm_position.length) for f in request.mm_features]
                    record = self.requests[key] = RequestDrafts(spans)
                rows = query_start[i + 1] - query_start[i]
                sampled = not discarded[i]
                if record.drafts and rows > self.num_speculative_tokens + 1:
                    record.resumed = True  # a multi-token prefill after drafting began
                record.windows.append((seq_lens[i] - rows, seq_lens[i], sampled))
                if sampled:
                    state = seq_lens[i] - rejected[i] + 1
                    record.drafts.setdefault(state, []).append(drafts[i].tolist())
                    if record.resumed:
                        record.after_resume.add(state)
            return drafts

        drafter.propose = propose
        return self

    def __exit__(self, *exc) -> None:
        del self.runner.drafter.propose
