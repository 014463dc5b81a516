"""vLLM 0.32.0, CPU without Triton: the stand-in for `rejection_sampler.expand_kernel` loses its result.

Plain vLLM, no plugin. Run: python docs/upstream/expand_kernel.py

`expand_batch_to_tokens` (vllm/v1/sample/rejection_sampler.py) expands a per-request tensor
(temperature, top-k, top-p) to one value per draft position. It allocates its output with
`new_empty` and asks `expand_kernel` to fill it. Without Triton, the CPU platform replaces that
kernel by `vllm.utils.cpu_triton_utils._expand_kernel_impl`, which hands the C++ op
`_ensure_int64(output)` and `_ensure_int64(input_val)`: for a float32 or int32 output that is a
converted copy, which the op fills and the caller never sees. So the rejection sampler divides the
logits by uninitialised memory and applies uninitialised top-k / top-p at every verified position.
"""

import os

os.environ["VLLM_PLUGINS"] = ""  # load no general plugin (by default vLLM loads every installed one)
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")

import torch  # noqa: E402
import vllm  # noqa: E402
from vllm.platforms import current_platform  # noqa: E402
from vllm.plugins import DEFAULT_PLUGINS_GROUP, load_general_plugins, load_plugins_by_group  # noqa: E402
from vllm.triton_utils import HAS_TRITON  # noqa: E402

print(f"vLLM {vllm.__version__}; general plugins loaded: {sorted(load_plugins_by_group(DEFAULT_PLUGINS_GROUP))}")
if not current_platform.is_cpu() or HAS_TRITON:
    raise SystemExit("needs vLLM's CPU platform without Triton (where vLLM registers its C++ stand-ins)")

# What a CPU worker does at start-up (WorkerBase.init_worker, then CpuPlatform).
load_general_plugins()
current_platform.import_kernels()
current_platform.register_triton_kernel_overrides()

from vllm.utils import cpu_triton_utils  # noqa: E402
from vllm.v1.sample.rejection_sampler import expand_batch_to_tokens  # noqa: E402


def rounded(values: torch.Tensor) -> list:
    return [round(v, 4) if isinstance(v, float) else v for v in values.tolist()]


# 1. The stand-in itself, on an output that holds a sentinel: nothing is written to it.
cu_num_tokens = torch.tensor([3, 6], dtype=torch.int32)  # request 0 owns positions 0-2, request 1 3-5
for values in (torch.tensor([1.0, 0.7]), torch.tensor([5, 20], dtype=torch.int32),
               torch.tensor([5, 20], dtype=torch.int64)):
    output = torch.full((6,), -1, dtype=values.dtype)
    cpu_triton_utils._expand_kernel_impl(output, values, cu_num_tokens, 0, 0)
    expected = values.repeat_interleave(3)
    print(f"{str(values.dtype):14} expected {rounded(expected)}, got {rounded(output)}"
          f" -> {'OK' if torch.equal(output, expected) else 'WRONG'}")

# 2. What the rejection sampler calls (temperature of two requests, K=3 each).
temperature = expand_batch_to_tokens(torch.tensor([1.0, 0.7]), cu_num_tokens, 6, replace_from=0, replace_to=1)
print(f"expand_batch_to_tokens(temperature [1.0, 0.7]) = {rounded(temperature)}"
      " (expected [1.0, 1.0, 1.0, 0.7, 0.7, 0.7])")
