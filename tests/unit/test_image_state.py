"""The proposer's image state (vispec_vllm/proposer_state.py: capacity, eviction, lookups, the
state log line) and the route of its miss count to /metrics (patches/image_state_metrics.py),
without an engine."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vispec_vllm.proposer_state import (
    IMAGE_STATE_CAPACITY_ENV,
    NOT_SETTLED,
    CompressedImage,
    ViSpecProposerState,
    image_state_capacity,
)

HIDDEN = 8


def state(capacity: int) -> ViSpecProposerState:
    return ViSpecProposerState(capacity, max_batch_size=4, hidden_size=HIDDEN, dtype=torch.float32,
                               device=torch.device("cpu"))


def image(value: float) -> CompressedImage:
    return CompressedImage(torch.full((1, HIDDEN), value), torch.full((HIDDEN,), value))


def test_capacity_from_the_environment(monkeypatch):
    monkeypatch.delenv(IMAGE_STATE_CAPACITY_ENV, raising=False)
    assert image_state_capacity(max_num_seqs=8) == 4096
    assert image_state_capacity(max_num_seqs=1024) == 8 * 1024
    monkeypatch.setenv(IMAGE_STATE_CAPACITY_ENV, "3")
    assert image_state_capacity(max_num_seqs=8) == 3
    for bad in ("0", "-2", "many"):
        monkeypatch.setenv(IMAGE_STATE_CAPACITY_ENV, bad)
        with pytest.raises(ValueError, match=IMAGE_STATE_CAPACITY_ENV):
            image_state_capacity(max_num_seqs=8)


def test_least_recently_used_image_is_evicted():
    images = state(capacity=2)
    images.remember("a", image(1))
    images.remember("b", image(2))
    assert images.lookup("a") is not None  # "a" is now the most recently used
    images.remember("c", image(3))
    assert list(images.images) == ["a", "c"]
    assert images.lookup("b") is None
    images.remember("d", image(4))
    assert list(images.images) == ["c", "d"]
    assert float(images.lookup("c").global_image_term[0]) == 3.0


def test_state_line_counts_tensors_and_misses():
    images = state(capacity=4)
    images.remember("a", image(1))
    images.remember("b", image(2))
    images.settle(0, "request-1", 10, torch.ones(HIDDEN))
    images.image_state_misses = 3
    line = images.summary()
    assert "1 requests with image state" in line and "2 cached images (capacity 4)" in line
    assert "5 cached tensors" in line and "3 image-state misses" in line
    assert images.take_new_image_state_misses() == 3
    images.image_state_misses += 2
    assert images.take_new_image_state_misses() == 2
    assert images.take_new_image_state_misses() == 0


def test_compressed_images_come_from_the_state_or_the_encoder_cache():
    images = state(capacity=4)
    images.remember("cached", image(1))
    compressed = []

    def compress(embeds):  # the adaptor's stand-in: tokens = embeds, g = their sum
        compressed.append(embeds)
        return embeds, embeds.sum(0)

    encoder_cache = {"encoded": torch.ones(1, HIDDEN), "cached": torch.zeros(1, HIDDEN)}
    found = images.compressed_images({0: "cached", 1: "encoded", 2: "gone", 3: "encoded", 4: "gone"},
                                     encoder_cache, compress)
    assert sorted(found) == [0, 1, 3] and found[1] is found[3]
    assert float(found[0].global_image_term[0]) == 1.0  # the state's, not the encoder cache's
    assert float(found[1].global_image_term[0]) == 1.0 and len(compressed) == 1  # compressed once
    assert images.lookup("encoded") is found[1]  # kept for later chunks and prefix-cache hits
    assert images.image_state_misses == 1  # one missing image, asked for twice in the step
    images.compressed_images({0: "gone"}, encoder_cache, compress)
    assert images.image_state_misses == 2 and images.missing_image_warned


def test_batch_rows_follow_the_input_batch():
    rows = state(capacity=4)
    with_image = SimpleNamespace(mm_features=[SimpleNamespace(modality="image", identifier="x",
                                                              mm_position=SimpleNamespace(offset=2, length=5))])
    text_only = SimpleNamespace(mm_features=[])
    requests = {"r1": with_image, "r2": text_only, "r3": with_image}
    rows.sync_batch(["r1", "r2", "r3"], requests)
    assert rows.settled_from[:3].tolist() == [NOT_SETTLED, 0, NOT_SETTLED]  # text only: settled from 0
    rows.settle(2, "r3", 6, torch.full((HIDDEN,), 7.0))
    # A request joins at the end: the rows that keep their request keep their state.
    requests["r4"] = with_image
    rows.sync_batch(["r1", "r2", "r3", "r4"], requests)
    assert rows.settled_from[:4].tolist() == [NOT_SETTLED, 0, 6, NOT_SETTLED]
    assert torch.equal(rows.decode_global_image_term[2], torch.full((HIDDEN,), 7.0))
    # A text-only request takes the row of a settled one: its row fuses zero from position 0.
    requests["r5"] = text_only
    rows.sync_batch(["r1", "r2", "r5", "r4"], requests)
    assert rows.settled_from[2] == 0 and not rows.decode_global_image_term[2].any()
    rows.sync_batch(["r1", "r2", "r3"], requests)
    # The batch reorders (vLLM's condense / swap): r3 moves to row 0 and keeps its g.
    rows.sync_batch(["r3", "r1"], requests)
    assert rows.settled_from[:2].tolist() == [6, NOT_SETTLED]
    assert torch.equal(rows.decode_global_image_term[0], torch.full((HIDDEN,), 7.0))
    assert not rows.decode_global_image_term[1].any()
    # r3 leaves: its state is freed at the next change of the batch.
    del requests["r3"]
    rows.sync_batch(["r1"], requests)
    assert "r3" not in rows.settled


# -- the route of the miss count (patches/image_state_metrics.py) --------------------------------

@pytest.fixture(scope="module")
def metrics_patch():
    from vispec_vllm.patches import image_state_metrics

    image_state_metrics.apply()
    return image_state_metrics


def test_misses_cross_the_engine_core_to_api_server_message(metrics_patch):
    from vllm.v1.engine import EngineCoreOutputs
    from vllm.v1.metrics.stats import SchedulerStats
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    stats = SchedulerStats(num_running_reqs=2)
    setattr(stats, metrics_patch.MISSES_FIELD, 5)

    def round_trip(stats: SchedulerStats) -> SchedulerStats:
        message = MsgpackEncoder().encode(EngineCoreOutputs(scheduler_stats=stats))
        return MsgpackDecoder(EngineCoreOutputs).decode(message).scheduler_stats

    decoded = round_trip(stats)
    assert getattr(decoded, metrics_patch.MISSES_FIELD) == 5 and decoded.num_running_reqs == 2
    assert getattr(round_trip(SchedulerStats()), metrics_patch.MISSES_FIELD) == 0


def test_misses_flow_from_runner_to_counter(metrics_patch):
    from prometheus_client import REGISTRY
    from vllm.v1.metrics.stats import SchedulerStats
    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput

    field = metrics_patch.MISSES_FIELD
    pending = {"misses": 4}

    def take():
        misses, pending["misses"] = pending["misses"], 0
        return misses

    # Worker: the step's output carries the misses (and keeps them through pickling).
    runner = SimpleNamespace(drafter=SimpleNamespace(take_new_image_state_misses=take))
    sample_tokens = metrics_patch._make_sample_tokens(lambda self: self.next_output)
    runner.next_output = EMPTY_MODEL_RUNNER_OUTPUT  # shared object: nothing attached, nothing taken
    sample_tokens(runner)
    assert not hasattr(EMPTY_MODEL_RUNNER_OUTPUT, field) and pending["misses"] == 4
    runner.next_output = ModelRunnerOutput(req_ids=["r"], req_id_to_index={"r": 0})
    output = pickle.loads(pickle.dumps(sample_tokens(runner)))
    assert getattr(output, field) == 4 and pending["misses"] == 0

    # Engine core: summed over steps, handed to the next stats, then reset.
    scheduler = SimpleNamespace()
    update = metrics_patch._make_update_from_output(lambda self, scheduler_output, runner_output: {})
    make_stats = metrics_patch._make_make_stats(lambda self: SchedulerStats())
    update(scheduler, None, output)
    update(scheduler, None, output)
    stats = make_stats(scheduler)
    assert getattr(stats, field) == 8
    assert getattr(make_stats(scheduler), field) == 0

    # API server: the counter grows by what the stats carry.
    record = metrics_patch._make_record(lambda self, scheduler_stats, *args, **kwargs: None)
    record(None, SchedulerStats())  # registers the counter
    name = f"{metrics_patch.COUNTER_NAME}_total"
    before = REGISTRY.get_sample_value(name)
    record(None, stats, None)
    assert REGISTRY.get_sample_value(name) == before + 8


def test_settled_rows_read_the_block_table_without_their_dropped_blocks():
    rows = state(capacity=4)
    with_image = SimpleNamespace(mm_features=[SimpleNamespace(modality="image", identifier="x",
                                                              mm_position=SimpleNamespace(offset=2, length=40))])
    requests = {"r1": with_image, "r2": SimpleNamespace(mm_features=[]), "r3": with_image}
    rows.sync_batch(["r1", "r2", "r3"], requests)
    width, block_size = 8, 8
    window_start = np.array([50, 7, 30, 0])
    assert rows.key_blocks_read(window_start, 3, width, block_size) is None  # nobody settled yet
    rows.settle(0, "r1", 41, torch.ones(HIDDEN), np.array([1, 2, 3]))
    rows.settle(2, "r3", 41, torch.ones(HIDDEN), np.array([1, 2, 3]))
    read = rows.key_blocks_read(window_start, 3, width, block_size)
    # r1's window starts past its image: it skips blocks 1-3 (24 keys). r3 settled during this
    # step (its window starts inside the image) and r2 has no image: both read every block.
    assert read.index[0].tolist()[:5] == [0, 4, 5, 6, 7] and read.index[1:].tolist() == [list(range(width))] * 2
    assert read.skipped_rows.tolist() == [24, 0, 0]
    assert rows.key_blocks_read(window_start, 3, width, block_size) is read  # the same rows: kept
    # r3's next step starts past its image; then r1 leaves the batch and r3 moves to row 0.
    both = rows.key_blocks_read(np.array([54, 8, 45, 0]), 3, width, block_size)
    assert both.skipped_rows.tolist() == [24, 0, 24]
    rows.sync_batch(["r3", "r2"], {"r2": requests["r2"], "r3": with_image})
    moved = rows.key_blocks_read(np.array([46, 9, 0, 0]), 2, width, block_size)
    assert moved.skipped_rows.tolist() == [24, 0] and moved.index[0].tolist()[:2] == [0, 4]
