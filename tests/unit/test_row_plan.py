"""The row plan (vispec_vllm/row_plan.py) against hand-written cases and a naive per-row reference.

The reference below is written straight from the rules, row by row and image by image, with none
of the code under test: for an image at token positions [o, o+L), image rows are [o-1, o+L-1), the
last num_q-1 of them hold the compressed tokens and the others are dropped; rows from o+L-1 until
the next image's first row fuse the image's g; rows before any image fuse zero (-1). Keeping image
rows (the `keep_image_rows` ablation) drops none of them: a row that would be dropped is a row that
fuses zero, like every image row.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from vispec_vllm.row_plan import ImageSpan, dropped_key_blocks, key_block_index, plan_rows

Image = tuple[int, int]  # (offset, length)


def naive_plan(images: list[list[Image]], num_q: int, windows: list[tuple[int, int]], keep_image_rows: bool = False):
    """Per row: (is_dropped, compressed_index, global_feature_source); per request: the following row's source.

    Images are numbered in the order given, request by request.
    """
    num_compressed = num_q - 1
    numbered, index = [], 0
    for request_images in images:
        numbered.append([(index + k, offset, length) for k, (offset, length) in enumerate(request_images)])
        index += len(request_images)

    def row(request: int, pos: int) -> tuple[bool, int, int]:
        by_offset = sorted(numbered[request], key=lambda image: image[1])
        for image, offset, length in by_offset:
            first_row, end_row = offset - 1, offset + length - 1
            if first_row <= pos < end_row:
                rows_left = end_row - pos  # 1 for the image's last row
                if rows_left <= num_compressed:
                    return False, image * num_compressed + (num_compressed - rows_left), -1
                return not keep_image_rows, -1, -1
        for k, (image, offset, length) in enumerate(by_offset):
            next_first_row = by_offset[k + 1][1] - 1 if k + 1 < len(by_offset) else float("inf")
            if offset + length - 1 <= pos < next_first_row:
                return False, -1, image
        return False, -1, -1

    rows = [row(r, pos) for r, (start, end) in enumerate(windows) for pos in range(start, end)]
    following = [row(r, end)[2] for r, (_, end) in enumerate(windows)]
    return ([d for d, _, _ in rows], [c for _, c, _ in rows], [g for _, _, g in rows], following)


def run_plan(images: list[list[Image]], num_q: int, windows: list[tuple[int, int]], order: list[int] | None = None,
             keep_image_rows: bool = False):
    """plan_rows on the same inputs; `order` hands the spans over permuted (indices stay the caller's)."""
    flat = [(r, offset, length) for r, request_images in enumerate(images) for offset, length in request_images]
    order = order or list(range(len(flat)))
    spans = [ImageSpan(flat[i][1], flat[i][2], request=flat[i][0]) for i in order]
    lengths = [end - start for start, end in windows]
    query_start = torch.tensor([0] + lengths).cumsum(0)
    plan = plan_rows(spans, num_q, query_start, torch.tensor([start for start, _ in windows]),
                     keep_image_rows=keep_image_rows)
    relabel = torch.tensor(order + [-1])  # position in the permuted table -> the caller's index
    num_compressed = num_q - 1
    compressed = plan.compressed_index
    if num_compressed:
        image = torch.where(compressed >= 0, compressed // num_compressed, -1)
        compressed = torch.where(compressed >= 0, relabel[image] * num_compressed + compressed % num_compressed, -1)
    return (plan.is_dropped.tolist(), compressed.tolist(), relabel[plan.global_feature_source].tolist(),
            relabel[plan.following_global_feature_source].tolist())


def check(images, num_q, windows, order=None, keep_image_rows=False):
    expected = naive_plan(images, num_q, windows, keep_image_rows)
    assert run_plan(images, num_q, windows, order, keep_image_rows) == expected
    # The images the plan says its rows refer to: exactly those whose tokens or g a row takes.
    _, compressed, global_feature_source, following = expected
    num_compressed = num_q - 1
    referenced = ({c // num_compressed for c in compressed if c >= 0} | {g for g in global_feature_source if g >= 0}
                  | {g for g in following if g >= 0})
    assert referenced_images(images, num_q, windows, order, keep_image_rows) == referenced


def referenced_images(images, num_q, windows, order=None, keep_image_rows=False) -> set[int]:
    flat = [(r, offset, length) for r, request_images in enumerate(images) for offset, length in request_images]
    order = order or list(range(len(flat)))
    spans = [ImageSpan(flat[i][1], flat[i][2], request=flat[i][0]) for i in order]
    query_start = torch.tensor([0] + [end - start for start, end in windows]).cumsum(0)
    plan = plan_rows(spans, num_q, query_start, torch.tensor([start for start, _ in windows]),
                     keep_image_rows=keep_image_rows)
    return {order[k] for k in plan.referenced_images}


# -- hand-written cases -------------------------------------------------------------------------

def test_one_image():
    # Image tokens at positions 3..6: image rows 2..5, the last (5) holds the one compressed token.
    dropped, compressed, g, following = run_plan([[(3, 4)]], 2, [(0, 10)])
    assert dropped == [False, False, True, True, True, False, False, False, False, False]
    assert compressed == [-1, -1, -1, -1, -1, 0, -1, -1, -1, -1]
    assert g == [-1, -1, -1, -1, -1, -1, 0, 0, 0, 0]
    assert following == [0]


def test_two_adjacent_images():
    # A at 2..4 (rows 1..3), B at 5..6 (rows 4..5): no row fuses A's g, rows from 6 fuse B's.
    dropped, compressed, g, following = run_plan([[(2, 3), (5, 2)]], 2, [(0, 8)])
    assert dropped == [False, True, True, False, True, False, False, False]
    assert compressed == [-1, -1, -1, 0, -1, 1, -1, -1]
    assert g == [-1, -1, -1, -1, -1, -1, 1, 1]
    assert following == [1]


def test_image_split_across_prefill_chunks():
    # Image at 2..9 (rows 1..8); chunks [0, 5) and [5, 12): the compressed row (8) is in the second.
    first = run_plan([[(2, 8)]], 2, [(0, 5)])
    second = run_plan([[(2, 8)]], 2, [(5, 12)])
    assert first == ([False, True, True, True, True], [-1] * 5, [-1] * 5, [-1])
    assert second == ([True, True, True, False, False, False, False], [-1, -1, -1, 0, -1, -1, -1],
                      [-1, -1, -1, -1, 0, 0, 0], [0])
    check([[(2, 8)]], 2, [(0, 5)])
    check([[(2, 8)]], 2, [(5, 12)])


def test_text_only_rows():
    assert run_plan([[]], 2, [(0, 6)]) == ([False] * 6, [-1] * 6, [-1] * 6, [-1])


def test_decode_step_fuses_the_last_image():
    # Two images in the prompt; a decode step verifying 4 rows long after them.
    assert run_plan([[(1, 3), (6, 4)]], 2, [(40, 44)]) == ([False] * 4, [-1] * 4, [1] * 4, [1])


def test_prefix_cache_hit_window_after_the_image():
    # The window starts past the image's rows (the prefix cache held them): every row fuses its g.
    assert run_plan([[(2, 4)]], 2, [(8, 15)]) == ([False] * 7, [-1] * 7, [0] * 7, [0])


def test_five_queries_short_image():
    # num_q=5: four compressed tokens; an image of 3 tokens has 3 image rows: tokens 1, 2, 3.
    dropped, compressed, g, following = run_plan([[(2, 3)]], 5, [(0, 6)])
    assert dropped == [False] * 6
    assert compressed == [-1, 1, 2, 3, -1, -1]
    assert g == [-1, -1, -1, -1, 0, 0]


def test_image_at_position_zero_has_no_row_before_it():
    # Image at 0..3: its rows are -1..2; row -1 does not exist, so no row is lost but its own.
    assert run_plan([[(0, 4)]], 2, [(0, 5)]) == ([True, True, False, False, False], [-1, -1, 0, -1, -1],
                                                  [-1, -1, -1, 0, 0], [0])


def test_one_query_drops_every_image_row():
    assert run_plan([[(2, 3)]], 1, [(0, 6)]) == ([False, True, True, True, False, False], [-1] * 6,
                                                  [-1, -1, -1, -1, 0, 0], [0])


def test_kept_image_rows_are_not_dropped_and_fuse_zero():
    # As test_one_image, with the image rows kept: only the dropped flags change.
    dropped, compressed, g, following = run_plan([[(3, 4)]], 2, [(0, 10)], keep_image_rows=True)
    assert dropped == [False] * 10
    assert compressed == [-1, -1, -1, -1, -1, 0, -1, -1, -1, -1]
    assert g == [-1, -1, -1, -1, -1, -1, 0, 0, 0, 0]
    assert following == [0]


def test_kept_image_rows_between_two_images_fuse_zero_not_the_first_image():
    # A at 2..4 (rows 1..3), B at 7..9 (rows 6..8): B's kept rows 6, 7 fuse zero, not A's g.
    dropped, compressed, g, _ = run_plan([[(2, 3), (7, 3)]], 2, [(0, 11)], keep_image_rows=True)
    assert dropped == [False] * 11
    assert compressed == [-1, -1, -1, 0, -1, -1, -1, -1, 1, -1, -1]
    assert g == [-1, -1, -1, -1, 0, 0, -1, -1, -1, 1, 1]


def test_one_query_keeping_image_rows_drops_nothing():
    assert run_plan([[(2, 3)]], 1, [(0, 6)], keep_image_rows=True) == ([False] * 6, [-1] * 6,
                                                                       [-1, -1, -1, -1, 0, 0], [0])


def test_empty_batch_and_bad_input():
    assert run_plan([], 2, []) == ([], [], [], [])
    with pytest.raises(ValueError, match="num_q"):
        plan_rows([], 0, torch.tensor([0, 1]), torch.tensor([0]))
    with pytest.raises(ValueError, match="query_start"):
        plan_rows([], 2, torch.tensor([0, 1]), torch.tensor([0, 0]))


# -- against the naive reference ----------------------------------------------------------------

@pytest.mark.parametrize("keep_image_rows", [False, True])
@pytest.mark.parametrize("num_q", [1, 2, 5])
def test_mixed_batch(num_q, keep_image_rows):
    images = [
        [(3, 6)],                  # prefill of a one-image prompt
        [],                        # text only
        [(1, 4), (5, 3), (12, 7)],  # three images, two of them adjacent
        [(2, 9)],                  # decode far after its image
        [(10, 2), (30, 5)],        # a chunk between two images
        [(4, 4)],                  # a chunk that ends inside the image
    ]
    windows = [(0, 12), (0, 5), (0, 24), (50, 54), (15, 28), (0, 6)]
    check(images, num_q, windows, keep_image_rows=keep_image_rows)
    # spans handed over in another order
    check(images, num_q, windows, order=[6, 1, 0, 3, 2, 5, 4, 7], keep_image_rows=keep_image_rows)


@pytest.mark.parametrize("keep_image_rows", [False, True])
@pytest.mark.parametrize("num_q", [1, 2, 3, 5])
def test_random_batches(num_q, keep_image_rows):
    rng = random.Random(num_q)
    for _ in range(200):
        images, windows = [], []
        for _ in range(rng.randint(1, 5)):
            request_images, pos = [], rng.randint(0, 3)
            for _ in range(rng.randint(0, 3)):
                length = rng.randint(1, 7)
                request_images.append((pos, length))
                pos += length + rng.choice([0, 0, 1, 2, 5])
            start = rng.randint(0, pos + 3)
            windows.append((start, start + rng.randint(0, 12)))
            images.append(request_images)
        flat = sum(len(i) for i in images)
        check(images, num_q, windows, order=rng.sample(range(flat), flat), keep_image_rows=keep_image_rows)


@pytest.mark.parametrize("seed", range(20))
def test_dropped_key_blocks_are_the_blocks_every_row_of_which_the_plan_drops(seed):
    rng = np.random.default_rng(seed)
    block_size, num_q = int(rng.choice([4, 8, 32])), int(rng.integers(1, 4))
    images, offset = [], int(rng.integers(1, 10))
    for _ in range(int(rng.integers(1, 4))):
        length = int(rng.integers(1, 80))
        images.append(ImageSpan(offset, length))
        offset += length + int(rng.integers(0, 20))
    length = offset + 5
    plan = plan_rows(images, num_q, np.array([0, length]), np.array([0]))
    dropped = plan.is_dropped.numpy()
    expected = [b for b in range(length // block_size) if dropped[b * block_size:(b + 1) * block_size].all()]
    assert dropped_key_blocks(images, num_q, block_size).tolist() == expected
    assert dropped_key_blocks(images, num_q, block_size, keep_image_rows=True).size == 0


def test_the_key_block_index_leaves_out_each_rows_dropped_blocks():
    width = 6
    table = np.arange(100, 100 + 3 * width).reshape(3, width)
    index, skipped = key_block_index([np.array([1, 2]), np.zeros(0, dtype=np.int64), np.array([0, 4, 9])], width)
    read = np.take_along_axis(table, index, 1)
    assert read[0, :4].tolist() == [100, 103, 104, 105] and read[1].tolist() == table[1].tolist()
    assert read[2, :4].tolist() == [113, 114, 115, 117]  # block 9 lies past the table: not counted
    assert skipped.tolist() == [2, 0, 2]


@pytest.mark.parametrize("seed", range(10))
def test_the_key_block_index_reads_each_rows_kept_blocks_in_order(seed):
    rng = np.random.default_rng(seed)
    width = int(rng.integers(1, 12))
    dropped = [np.unique(rng.integers(0, width + 3, int(rng.integers(0, width + 2)))) for _ in range(6)]
    dropped.append(np.arange(width))  # every block dropped: the row reads them all
    index, skipped = key_block_index(dropped, width)
    for row, blocks in enumerate(dropped):
        inside = blocks[blocks < width]
        kept = [b for b in range(width) if b not in inside] if inside.size < width else list(range(width))
        assert skipped[row] == width - len(kept)
        assert index[row, : len(kept)].tolist() == kept
        assert (index[row, len(kept):] == kept[-1]).all()
