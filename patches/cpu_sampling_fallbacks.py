"""Patch: make speculative sampling at temperature > 0 lossless on vLLM's CPU backend.

vLLM function: `vllm.utils.cpu_triton_utils._expand_kernel_impl` (vLLM 0.32.0), the CPU stand-in
for the Triton kernel `vllm.v1.sample.rejection_sampler.expand_kernel`, in the worker process.
`expand_batch_to_tokens` allocates its output with `new_empty` and asks the kernel to fill it with
each request's value, repeated for each of its draft positions. The CPU stand-in hands the C++ op
`_ensure_int64(output)`, which for any output that is not int64 (temperature and top-p are
float32, top-k is int32) is a converted copy: the op fills the copy, and the caller gets its
uninitialised tensor back. The rejection sampler then divides every verified position's logits by
garbage and applies garbage top-k/top-p, so the target distribution it samples from is not the
target's: outputs at T > 0 are not what the target alone would produce (greedy requests are
untouched). `expand_batch_to_tokens(torch.tensor([1.0, 0.7]), torch.tensor([3, 6]), 6)` returns
zeros or denormals instead of [1, 1, 1, 0.7, 0.7, 0.7].

The replacement below does the kernel's job in PyTorch, in the output's own dtype. It is applied
for every speculative method (it is vLLM's bug; any speculative CPU user hits it), and it works
only if it is in place before the worker registers its CPU kernel overrides:
`WorkerBase.init_worker` loads general plugins, then calls
`current_platform.register_triton_kernel_overrides()`, which reads the module attribute once and
routes `rejection_sampler._expand` to it (`vllm.triton_utils.dispatcher.register_kernels`). So
the replacement checks that order where it matters: `RejectionSampler.__init__` (the model
runner builds one when speculation is on, after the overrides are registered) is wrapped to
confirm that the kernel `_expand` launches is this replacement, and otherwise stops start-up
with a `PatchError` naming this unit (were vLLM's stand-in registered instead, every sampled
output with speculation would silently come from the wrong distribution).
Guard: the CPU platform without Triton (where vLLM registers these fallbacks), vLLM 0.32.0 (the
plugin loads under no other). It can go when vLLM's CPU fallback writes into `output` itself
(vLLM issue #55005, fix PR #55006; docs/upstream.md §1).

Second unit, same process: `vllm.v1.sample.ops.topk_topp_sampler.apply_top_k_only`, the
sort-free top-k that vLLM uses where it may sync with the host (CPU). On a verify step whose
requests carry no draft tokens, the rejection sampler hands it logits of shape [0, vocab], and
`k.max()` of an empty tensor raises: one request with `top_k` set and speculation on stopped the
whole engine. An empty batch has nothing to mask, so it is returned as it is. It can go when
vLLM's `apply_top_k_only` returns early on an empty batch (docs/upstream.md §2).
"""

from __future__ import annotations

import torch
from vispec_vllm.patches._wrap import PatchError, wrap


def expand_kernel(output: torch.Tensor, input_val: torch.Tensor, cu_num_tokens: torch.Tensor, replace_from,
                  replace_to, MAX_NUM_TOKENS=None) -> None:  # noqa: N803 (the Triton kernel's argument name)
    """What `rejection_sampler.expand_kernel` does: request r's value (replace_from -> replace_to)
    written to output[cu_num_tokens[r-1] : cu_num_tokens[r]], in output's dtype."""
    values = torch.where(input_val == replace_from, torch.as_tensor(replace_to, dtype=input_val.dtype), input_val)
    run_end = cu_num_tokens.to(torch.int64)
    run_start = torch.cat((run_end.new_zeros(1), run_end[:-1]))
    run_length = run_end - run_start
    if MAX_NUM_TOKENS is not None:  # the kernel writes at most MAX_NUM_TOKENS positions per request
        run_length = run_length.clamp(max=MAX_NUM_TOKENS)
    total = int(run_length.sum())
    request_of_token = torch.repeat_interleave(torch.arange(len(run_length)), run_length, output_size=total)
    offset_in_run = torch.arange(total) - (torch.cumsum(run_length, 0) - run_length)[request_of_token]
    output[run_start[request_of_token] + offset_in_run] = values[request_of_token].to(output.dtype)


def _make_apply_top_k_only(original):
    def apply_top_k_only(logits: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        if logits.shape[0] == 0:  # no draft positions to verify this step
            return logits
        return original(logits, k)

    return apply_top_k_only


def check_expand_kernel_in_effect() -> None:
    """Stop with a PatchError unless the kernel vLLM's `_expand` launches is `expand_kernel` above."""
    from vllm.v1.sample import rejection_sampler

    # After register_kernels, `_expand.kernel` is a KernelOverride whose `func` is what it calls.
    launched = getattr(rejection_sampler._expand.kernel, "func", None)
    if launched is not expand_kernel:
        raise PatchError(__name__, (
            "vLLM's rejection sampler launches "
            f"{getattr(launched, '__module__', '?')}.{getattr(launched, '__qualname__', launched)} for "
            "rejection_sampler.expand_kernel, not this patch's replacement: vLLM registered its CPU kernel "
            "overrides (CpuPlatform.register_triton_kernel_overrides) before the plugin replaced "
            "vllm.utils.cpu_triton_utils._expand_kernel_impl, so sampling at temperature > 0 with speculation "
            "would read uninitialised temperature, top-k and top-p"))


def _make_rejection_sampler_init(original_init):
    def __init__(self, *args, **kwargs) -> None:
        original_init(self, *args, **kwargs)
        check_expand_kernel_in_effect()

    return __init__


def applies() -> bool:
    from vllm.platforms import current_platform
    from vllm.triton_utils import HAS_TRITON

    return current_platform.is_cpu() and not HAS_TRITON


def apply() -> None:
    if not applies():
        return
    from vllm.utils import cpu_triton_utils
    from vllm.v1.sample.ops import topk_topp_sampler
    from vllm.v1.sample.rejection_sampler import RejectionSampler

    # vLLM's stand-in loses its result (see above): replaced, not called.
    wrap(cpu_triton_utils, "_expand_kernel_impl", lambda original_expand_kernel: expand_kernel)
    wrap(RejectionSampler, "__init__", _make_rejection_sampler_init)
    wrap(topk_topp_sampler, "apply_top_k_only", _make_apply_top_k_only)
