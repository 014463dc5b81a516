"""Run by test_tensor_parallel.py in its own process: vLLM's multiprocess executor spawns workers,
which needs a `__main__` guard. Reads scene seeds (JSON) on stdin; prints one JSON line: outputs and
speculative counters, accepted tokens per draft position among them."""

import json
import sys

from conftest import chat_tokens, make_llm

from vispec_vllm.demo.prompts import scene_prompt


def main() -> None:
    target, draft, tp, k = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    scene_seeds = json.loads(sys.stdin.read())
    llm = make_llm(target, tensor_parallel_size=tp, distributed_executor_backend="mp", disable_log_stats=False,
                   limit_mm_per_prompt={"image": 1},
                   speculative_config={"model": draft, "num_speculative_tokens": k})
    outputs = chat_tokens(llm, [scene_prompt(seed) for seed in scene_seeds], max_tokens=64, ignore_eos=False)
    metrics = {m.name: m for m in llm.get_metrics()}
    print("RESULT " + json.dumps({
        "outputs": outputs,
        "drafts": metrics["vllm:spec_decode_num_drafts"].value,
        "draft_tokens": metrics["vllm:spec_decode_num_draft_tokens"].value,
        "accepted": metrics["vllm:spec_decode_num_accepted_tokens"].value,
        "accepted_per_position": metrics["vllm:spec_decode_num_accepted_tokens_per_pos"].values,
    }))


if __name__ == "__main__":
    main()
