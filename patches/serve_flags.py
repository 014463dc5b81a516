"""Patch: accept `--speculative-model DRAFT [--num-speculative-tokens K]` on `vllm serve`.

vLLM functions: `vllm.engine.arg_utils.EngineArgs.add_cli_args` and `EngineArgs.from_cli_args`
(vLLM 0.32.0). Why: those V0-era flags are what users (and most ViSpec/EAGLE write-ups) type, but
vLLM 0.32 only has `--speculative-config` and rejects them. `AsyncEngineArgs.add_cli_args` loads
general plugins before building the parser, so the plugin can add both flags; `from_cli_args`
turns them into `speculative_config = {"model": DRAFT, "num_speculative_tokens": K}`.
Guard: does nothing unless `--speculative-model` is given; with `--speculative-config` as well,
start-up fails with one message (the two would contradict each other).
"""

from __future__ import annotations

import argparse

from vispec_vllm.patches._wrap import wrap

DEFAULT_NUM_SPECULATIVE_TOKENS = 3


def speculative_config_from_flags(draft: str, num_tokens: int | None, speculative_config) -> dict:
    from vispec_vllm.checkpoint import resolve_local_dir

    if speculative_config:
        raise ValueError("--speculative-model and --speculative-config both given; use one of them")
    if resolve_local_dir(draft) is None:
        raise ValueError(f"--speculative-model {draft}: not a local directory, not in the local Hugging Face cache, "
                         "and not downloadable (hub unreachable or HF_HUB_OFFLINE set)")
    return {"model": draft, "num_speculative_tokens": num_tokens or DEFAULT_NUM_SPECULATIVE_TOKENS}


def _make_add_cli_args(original_add_cli_args):
    def add_cli_args(parser):
        parser = original_add_cli_args(parser)
        group = parser.add_argument_group("vispec-vllm", "Speculative decoding shorthands (vispec-vllm plugin)")
        group.add_argument("--speculative-model", dest="vispec_speculative_model", default=None,
                           help="Draft checkpoint (local dir or hub id), e.g. a published ViSpec draft.")
        group.add_argument("--num-speculative-tokens", dest="vispec_num_speculative_tokens", type=int,
                           default=None, help=f"Draft tokens per step (default {DEFAULT_NUM_SPECULATIVE_TOKENS}).")
        return parser

    return add_cli_args


def _make_from_cli_args(original_from_cli_args):
    def from_cli_args(cls, args: argparse.Namespace):
        draft = getattr(args, "vispec_speculative_model", None)
        if draft is not None:
            args.speculative_config = speculative_config_from_flags(
                draft, getattr(args, "vispec_num_speculative_tokens", None), getattr(args, "speculative_config", None))
        elif getattr(args, "vispec_num_speculative_tokens", None) is not None:
            raise ValueError("--num-speculative-tokens needs --speculative-model")
        return original_from_cli_args(cls, args)

    return from_cli_args


def apply() -> None:
    from vllm.engine.arg_utils import EngineArgs

    wrap(EngineArgs, "add_cli_args", _make_add_cli_args)  # a staticmethod
    wrap(EngineArgs, "from_cli_args", _make_from_cli_args)  # a classmethod
