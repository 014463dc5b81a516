"""Run by test_tensor_parallel.py in its own process: vLLM's multiprocess executor spawns workers,
which needs a `__main__` guard. Prints one JSON line: outputs and speculative counters."""

import json
import sys

from conftest import chat_tokens, engine_metrics, make_llm, mixed_conversations


def main() -> None:
    target, draft, tp = sys.argv[1], sys.argv[2], int(sys.argv[3])
    llm = make_llm(target, tensor_parallel_size=tp, distributed_executor_backend="mp", disable_log_stats=False,
                   speculative_config={"model": draft, "num_speculative_tokens": 3})
    outputs = chat_tokens(llm, mixed_conversations())
    metrics = engine_metrics(llm)
    print("RESULT " + json.dumps({"outputs": outputs, "drafts": metrics["vllm:spec_decode_num_drafts"],
                                  "accepted": metrics["vllm:spec_decode_num_accepted_tokens"]}))


if __name__ == "__main__":
    main()
