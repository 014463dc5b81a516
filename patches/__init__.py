"""Every change vispec-vllm makes to vLLM's own behaviour, one small documented unit per file.

Each unit names the vLLM function it changes, why, and the vLLM version it was written against
(`vispec_vllm.SUPPORTED_VLLM_VERSION`; the plugin refuses any other). Units are applied by the
code that needs them and are idempotent.
"""
