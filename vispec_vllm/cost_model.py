"""A cost model of chain speculative decoding in vLLM: step times from a roofline plus measured
overheads, tokens/s with and without speculation at each batch size, and the load-adaptive
schedule (draft tokens per batch size) that maximises predicted tokens/s.

Pure Python: the plugin derives its schedule at start-up for the served target (its shape read
from the target's config), and the benchmarks (benchmarks/target_shapes.py: the catalogue of real
targets) use it on GPU machines where vLLM is not installed.

One engine step with K draft tokens (vLLM's EAGLE chain, which ViSpec uses) is
    step overhead + target forward over K+1 tokens per request
    + one draft forward over K+1 tokens per request (the verified tokens) + K-1 draft forwards over 1
and yields a mean acceptance length (accepted drafts + 1) of tokens per request. A forward costs
    layers x per-layer overhead + max(weight bytes / bandwidth, GEMM FLOPs / FLOP rate)
                                + max(KV bytes / bandwidth, attention FLOPs / FLOP rate)
with bandwidth and FLOP rate the spec-sheet numbers times fitted efficiencies
(benchmarks/cost_model.py fits them; tests/unit/test_cost_model.py checks the constants below
against the committed measurements).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from vispec_vllm.checkpoint_format import FAMILY_QKV_BIAS, draft_family

# --------------------------------------------------------------------------------------------
# Model shapes


@dataclass(frozen=True)
class LanguageModelShape:
    name: str
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    num_layers: int
    vocab_size: int
    qkv_bias: bool = False
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def layer_params(self) -> int:
        h, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        attention = h * h * 2 + h * kv * 2 + (h + 2 * kv if self.qkv_bias else 0)
        return attention + 3 * h * self.intermediate_size + 2 * h

    def lm_head_params(self) -> int:
        return self.hidden_size * self.vocab_size

    def decoder_params(self) -> int:
        """What one decode step reads: every layer, the final norm and the LM head (the embedding
        lookup reads one row per token)."""
        return self.num_layers * self.layer_params() + self.hidden_size + self.lm_head_params()

    def kv_bytes_per_token_per_layer(self, bytes_per_value: int = 2) -> int:
        return 2 * self.num_key_value_heads * self.head_dim * bytes_per_value

    def draft_layer(self) -> LanguageModelShape:
        """The ViSpec draft's one decoder layer: plain MHA in every released config, also for Qwen."""
        return replace(self, name=f"{self.name}-draft", num_key_value_heads=self.num_attention_heads, num_layers=1)

    @classmethod
    def from_hf_text_config(cls, text_config) -> LanguageModelShape:
        return cls(
            name=getattr(text_config, "model_type", "target"),
            hidden_size=text_config.hidden_size,
            intermediate_size=text_config.intermediate_size,
            num_attention_heads=text_config.num_attention_heads,
            num_key_value_heads=getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads,
            num_layers=text_config.num_hidden_layers,
            vocab_size=text_config.vocab_size,
            qkv_bias=FAMILY_QKV_BIAS[draft_family(getattr(text_config, "model_type", ""))],
            tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
        )


# --------------------------------------------------------------------------------------------
# Hardware


@dataclass(frozen=True)
class Hardware:
    name: str
    memory_bandwidth: float  # bytes/s, spec sheet
    matmul_flops: float  # FLOP/s in the serving dtype, dense, spec sheet
    bandwidth_efficiency: float  # fitted: the fraction of spec bandwidth a decode forward reaches
    compute_efficiency: float  # fitted: likewise for FLOPs
    layer_overhead_s: float  # fitted: per decoder layer per forward (kernel launch gaps, small ops)
    step_overhead_s: float  # per engine step outside the forwards (scheduler, sampler, input prep)
    draft_forward_overhead_s: float  # per draft forward (an eager draft's launches, metadata; less if captured)
    per_token_overhead_s: float = 0.0  # per token per forward, beyond the roofline (CPU kernels at tiny sizes)
    per_request_overhead_s: float = 0.0  # per running request per step (sampling, output handling: CPU)
    bytes_per_param: int = 2


# H100 SXM: 3.35 TB/s HBM3, 989 TFLOP/s dense bf16. Efficiencies and per-layer overhead fitted by
# `python benchmarks/cost_model.py` to benchmarks/results/step_times_h100.json (CUDA graphs, bf16),
# the eager draft's extra launch cost to step_times_h100_eager.json. The step overhead (vLLM's
# host work per step: scheduler, sampler, input preparation) is an assumption, not measured:
# vLLM cannot run on the lent GPU machines.
H100 = Hardware("H100 SXM", 3.35e12, 989e12, bandwidth_efficiency=0.83, compute_efficiency=0.6,
                layer_overhead_s=63e-6, step_overhead_s=0.5e-3, draft_forward_overhead_s=26e-6)
# H200: 4.8 TB/s HBM3e, the same compute. Same efficiencies as the H100: the H200 measurements
# (step_times_h200.json) check the model rather than tune it.
H200 = replace(H100, name="H200", memory_bandwidth=4.8e12)
# This machine (2 cores, vLLM's CPU backend, float32): the demo pair is tiny, so host work per step,
# per request and per token dominates. Fitted by `python benchmarks/cost_model.py` to
# benchmarks/results/serve_concurrency.json: step overhead and per-request + per-token cost to the
# runs without speculation, then the per-token share and the draft-forward overhead to ViSpec at a
# fixed K. Bandwidth and FLOP rate are rough (they barely matter at these sizes).
THIS_CPU = Hardware("2-core CPU, vLLM CPU backend", 20e9, 100e9, bandwidth_efficiency=1.0, compute_efficiency=1.0,
                    layer_overhead_s=0.0, step_overhead_s=4.997e-3, draft_forward_overhead_s=2.622e-3,
                    per_token_overhead_s=0.08057e-3, per_request_overhead_s=0.2511e-3, bytes_per_param=4)


# --------------------------------------------------------------------------------------------
# Step times and tokens/s


def forward_time(hardware: Hardware, shape: LanguageModelShape, batch: int, query_tokens: int, context: int,
                 extra_params: int = 0) -> float:
    """Seconds for one forward over `query_tokens` tokens of each of `batch` requests that attend
    to `context` tokens each. `extra_params` are weights outside the decoder layers (fc, img_fc)."""
    tokens = batch * query_tokens
    bandwidth = hardware.memory_bandwidth * hardware.bandwidth_efficiency
    flops = hardware.matmul_flops * hardware.compute_efficiency
    params = shape.decoder_params() + extra_params
    weights = max(params * hardware.bytes_per_param / bandwidth, 2 * params * tokens / flops)
    kv_bytes = shape.num_layers * batch * context * shape.kv_bytes_per_token_per_layer(hardware.bytes_per_param)
    attention_flops = shape.num_layers * 4 * tokens * context * shape.num_attention_heads * shape.head_dim
    attention = max(kv_bytes / bandwidth, attention_flops / flops)
    return (shape.num_layers * hardware.layer_overhead_s + tokens * hardware.per_token_overhead_s
            + weights + attention)


def target_forward_time(hardware: Hardware, shape: LanguageModelShape, batch: int, query_tokens: int,
                        context: int) -> float:
    return forward_time(hardware, shape, batch, query_tokens, context)


def draft_forward_time(hardware: Hardware, shape: LanguageModelShape, batch: int, query_tokens: int, context: int,
                       vispec: bool = True) -> float:
    """One draft forward: img_fc (ViSpec only) + fc + one MHA decoder layer + the target's LM head.
    The ViSpec draft keeps the full-length KV layout (dropped image rows are masked), so it
    attends to the whole context."""
    h = shape.hidden_size
    extra = 2 * h * h * (2 if vispec else 1)
    return forward_time(hardware, shape.draft_layer(), batch, query_tokens, context, extra_params=extra)


def step_time(hardware: Hardware, shape: LanguageModelShape, batch: int, num_draft_tokens: int, context: int,
              vispec: bool = True) -> float:
    """One engine step: verify K drafts (or decode one token when K = 0) and propose the next K."""
    k = num_draft_tokens
    seconds = (hardware.step_overhead_s + batch * hardware.per_request_overhead_s
               + target_forward_time(hardware, shape, batch, k + 1, context))
    if k > 0:
        first = draft_forward_time(hardware, shape, batch, k + 1, context, vispec)
        rest = draft_forward_time(hardware, shape, batch, 1, context, vispec)
        seconds += first + (k - 1) * rest + k * hardware.draft_forward_overhead_s
    return seconds


@dataclass(frozen=True)
class AcceptanceCurve:
    """Mean acceptance length (accepted drafts + 1 per step) as a function of K, from values
    measured at K = 1..n. Beyond n each extra draft position adds the last position's gain times
    the last ratio of consecutive gains (a geometric tail)."""

    mean_acceptance_length_by_k: dict[int, float]

    @classmethod
    def geometric(cls, acceptance_rate: float, max_k: int = 8) -> AcceptanceCurve:
        return cls({k: sum(acceptance_rate**i for i in range(k + 1)) for k in range(1, max_k + 1)})

    def __post_init__(self) -> None:
        measured = sorted(self.mean_acceptance_length_by_k)
        if measured != list(range(1, len(measured) + 1)):
            raise ValueError(f"mean acceptance lengths must be given for K = 1..n, got K = {measured}")

    def __call__(self, k: int) -> float:
        known = {0: 1.0, **self.mean_acceptance_length_by_k}
        if k in known:
            return known[k]
        top = max(known)
        gain = known[top] - known[top - 1]
        previous_gain = known[top - 1] - known[top - 2] if top >= 2 else 1.0
        ratio = gain / previous_gain if previous_gain > 0 else 0.0
        value = known[top]
        for _ in range(k - top):
            gain *= min(ratio, 1.0)
            value += gain
        return value


def tokens_per_second(hardware: Hardware, shape: LanguageModelShape, batch: int, num_draft_tokens: int,
                      acceptance: AcceptanceCurve, context: int, vispec: bool = True) -> float:
    seconds = step_time(hardware, shape, batch, num_draft_tokens, context, vispec)
    return batch * acceptance(num_draft_tokens) / seconds


def best_num_draft_tokens(hardware: Hardware, shape: LanguageModelShape, batch: int, max_k: int,
                          acceptance: AcceptanceCurve, context: int) -> int:
    rates = [tokens_per_second(hardware, shape, batch, k, acceptance, context) for k in range(max_k + 1)]
    return max(range(max_k + 1), key=lambda k: (rates[k], -k))


def derive_schedule(hardware: Hardware, shape: LanguageModelShape, max_k: int, acceptance: AcceptanceCurve,
                    context: int, max_batch: int = 1024) -> list[tuple[int, int, int]]:
    """vLLM's dynamic-SD table, (first batch size, last batch size, K), that maximises predicted
    tokens/s at each batch size. K never grows with the batch: a larger batch only makes the
    verifier more compute-bound."""
    schedule: list[tuple[int, int, int]] = []
    k_cap = max_k
    for batch in range(1, max_batch + 1):
        k = min(k_cap, best_num_draft_tokens(hardware, shape, batch, max_k, acceptance, context))
        k_cap = k
        if schedule and schedule[-1][2] == k:
            schedule[-1] = (schedule[-1][0], batch, k)
        else:
            schedule.append((batch, batch, k))
    first, _, k = schedule[-1]
    schedule[-1] = (first, 1_000_000, k)
    return schedule
