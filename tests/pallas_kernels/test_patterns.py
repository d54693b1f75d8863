"""Pattern masks against the paper's set definitions, components, and block layouts against the masks."""

import itertools

import numpy as np
import pytest

from pallas_kernels import patterns

# (n, stride, c): n below, equal to, a multiple of, and not a multiple of stride; c from 1 up to stride.
CASES = [
    (1, 3, 1),
    (5, 5, 2),
    (7, 3, 3),
    (16, 4, 1),
    (17, 4, 2),
    (37, 5, 2),
    (61, 7, 3),
    (64, 8, 8),
    (50, 1, 1),
    (23, 30, 4),
]


def brute_force_sets(kind: str, n: int, stride: int, c: int, part: str) -> list[set[int]]:
    """S_i straight from Child et al. 2019, one Python set per query i."""
    sets = []
    for i in range(n):
        if kind == "dense":
            sets.append(set(range(i + 1)))
            continue
        if kind == "strided":
            a1 = set(range(max(0, i - stride), i + 1))
            a2 = {j for j in range(i + 1) if (i - j) % stride == 0}
        else:
            a1 = {j for j in range(i + 1) if j // stride == i // stride}
            a2 = {j for j in range(i + 1) if j % stride >= stride - c}
        sets.append({"both": a1 | a2, "local": a1, "summary": a2}[part])
    return sets


def make(kind: str, stride: int, c: int, part: str) -> patterns.Pattern:
    if kind == "dense":
        return patterns.DenseCausal()
    if kind == "strided":
        return patterns.Strided(stride, part)
    return patterns.Fixed(stride, c, part)


KINDS = [("dense", "both")] + [(k, p) for k in ("strided", "fixed") for p in patterns.PARTS]


@pytest.mark.parametrize("kind,part", KINDS)
@pytest.mark.parametrize("n,stride,c", CASES)
def test_mask_matches_set_definition(kind, part, n, stride, c):
    mask = make(kind, stride, c, part).mask(n)
    assert mask.shape == (n, n) and mask.dtype == bool
    for i, s in enumerate(brute_force_sets(kind, n, stride, c, part)):
        assert set(np.flatnonzero(mask[i]).tolist()) == s, f"row {i}"


@pytest.mark.parametrize("kind,part", KINDS)
@pytest.mark.parametrize("n,stride,c", CASES)
def test_components_are_disjoint_and_cover_the_mask(kind, part, n, stride, c):
    pattern = make(kind, stride, c, part)
    cover = np.zeros((n, n), np.int32)
    for comp in pattern.components():
        q_pos, k_pos = comp.q_order(n), comp.k_order(n)
        # Query orders are permutations of 0..n-1; key orders list distinct positions, increasing per run.
        assert sorted(q_pos.tolist()) == list(range(n))
        assert len(set(k_pos.tolist())) == len(k_pos) and all(0 <= j < n for j in k_pos)
        cover[np.ix_(q_pos, k_pos)] += comp.mask(n)
    assert cover.max(initial=0) <= 1, "components overlap"
    np.testing.assert_array_equal(cover.astype(bool), pattern.mask(n))


def test_strided_summary_is_causal_down_grid_columns():
    # In column-major order A2 is block-diagonal: a key is only ever in its query's own column run.
    n, stride = 23, 5
    comp = patterns.Strided(stride, "summary").components()[0]
    order = comp.q_order(n)
    assert order.tolist() == [0, 5, 10, 15, 20, 1, 6, 11, 16, 21, 2, 7, 12, 17, 22, 3, 8, 13, 18, 4, 9, 14, 19]
    m = comp.mask(n)
    col = order % stride
    assert not (m & (col[:, None] != col[None, :])).any()
    np.testing.assert_array_equal(m, (col[:, None] == col[None, :]) & (order[None, :] <= order[:, None]))


def test_fixed_summary_keys_are_the_last_c_of_each_block():
    np.testing.assert_array_equal(patterns.summary_key_order(13, 5, 2), [3, 4, 8, 9])


def brute_force_tiles(mask: np.ndarray, bq: int, bk: int) -> np.ndarray:
    tq, tk = mask.shape
    tiles = np.zeros((-(-tq // bq), -(-tk // bk)), np.int8)
    for r, s in itertools.product(range(tiles.shape[0]), range(tiles.shape[1])):
        tile = mask[r * bq : (r + 1) * bq, s * bk : (s + 1) * bk]
        ragged = tile.shape != (bq, bk)
        if tile.any():
            tiles[r, s] = patterns.PARTIAL if ragged or not tile.all() else patterns.FULL
    return tiles


@pytest.mark.parametrize("kind,part", KINDS)
@pytest.mark.parametrize("n,stride,c", [(37, 5, 2), (64, 8, 3), (61, 7, 1)])
@pytest.mark.parametrize("bq,bk", [(4, 4), (8, 4), (5, 7), (16, 16), (64, 64)])
def test_block_layout_matches_mask(kind, part, n, stride, c, bq, bk):
    pattern = make(kind, stride, c, part)
    sparse = pattern.block_layout(n, bq, bk)
    assert [cl.name for cl in sparse.components] == [comp.name for comp in pattern.components()]
    for comp, cl in zip(pattern.components(), sparse.components, strict=True):
        np.testing.assert_array_equal(cl.q_positions, comp.q_order(n))
        np.testing.assert_array_equal(cl.k_positions, comp.k_order(n))
        lay = cl.layout
        tiles = brute_force_tiles(comp.mask(n), bq, bk)
        np.testing.assert_array_equal(lay.tiles, tiles)
        assert lay.num_blocks == int((tiles != patterns.EMPTY).sum())
        assert lay.num_full + lay.num_partial == lay.num_blocks
        for r in range(tiles.shape[0]):
            live = np.flatnonzero(tiles[r])
            count = lay.kv_counts[r]
            assert count == len(live)
            np.testing.assert_array_equal(lay.kv_blocks[r, :count], live)
            # Padding repeats the last valid index (0 when none) so a kernel re-uses the resident tile.
            np.testing.assert_array_equal(lay.kv_blocks[r, count:], live[-1] if count else 0)
            np.testing.assert_array_equal(lay.kv_full[r, :count], tiles[r, live] == patterns.FULL)
            assert not lay.kv_full[r, count:].any()
    assert sparse.num_blocks == sum(cl.layout.num_blocks for cl in sparse.components)


def test_dense_layout_is_the_lower_triangle_of_tiles():
    lay = patterns.DenseCausal().block_layout(64, 16, 16).components[0].layout
    np.testing.assert_array_equal(lay.kv_counts, [1, 2, 3, 4])
    assert lay.num_full == 6 and lay.num_partial == 4  # strictly-lower tiles are full, diagonal partial


def _fit_exponent(ns, counts) -> float:
    return float(np.polyfit(np.log(ns), np.log(counts), 1)[0])


def test_strided_block_count_grows_like_n_sqrt_n():
    # Fixed tile size, stride = sqrt(n): the live tile count must scale as n^1.5 (dense causal: n^2).
    b = 8
    ns = [256, 1024, 4096]
    strided = [patterns.Strided(int(np.sqrt(n))).block_layout(n, b, b).num_blocks for n in ns]
    fixed = [patterns.Fixed(int(np.sqrt(n)), 2).block_layout(n, b, b).num_blocks for n in ns]
    dense = [n // b * (n // b + 1) // 2 for n in ns]
    assert patterns.DenseCausal().block_layout(ns[0], b, b).num_blocks == dense[0]
    assert 1.3 < _fit_exponent(ns, strided) < 1.6, strided
    assert 1.3 < _fit_exponent(ns, fixed) < 1.6, fixed
    assert _fit_exponent(ns, dense) > 1.9
    # Covered area per n*sqrt(n) tends to 1.5 (band ~ stride + b per row, columns ~ R/2 per row).
    for n, count in zip(ns, strided, strict=True):
        assert 1.4 < count * b * b / n**1.5 < 2.5, (n, count)


@pytest.mark.parametrize(
    "args,match",
    [
        (("sparse",), "pattern must be one of"),
        (("dense", 4), "no stride"),
        (("dense", None, None, "local"), "no parts"),
        (("strided",), "needs stride"),
        (("strided", 0), "stride >= 1"),
        (("strided", 4, 2), "no summary"),
        (("strided", 4, None, "merged"), "part must be"),
        (("fixed", 4), "needs stride and summary"),
        (("fixed", 4, 5), "1 <= summary <= stride"),
        (("fixed", 4, 0), "1 <= summary <= stride"),
        (("fixed", 2.5, 1), "integer stride"),
    ],
)
def test_make_pattern_rejects_bad_parameters(args, match):
    with pytest.raises(ValueError, match=match):
        patterns.make_pattern(*args)


def test_make_pattern_builds_each_kind():
    assert patterns.make_pattern("dense") == patterns.DenseCausal()
    assert patterns.make_pattern("strided", 8) == patterns.Strided(8, "both")
    assert patterns.make_pattern("fixed", 8, 2, "summary") == patterns.Fixed(8, 2, "summary")


def test_block_layout_of_a_component_without_keys():
    # Fixed summary with T <= l - c: no position is a summary yet, so nothing is attended.
    layout = patterns.make_pattern("fixed", 8, 2, "summary").block_layout(5, 4, 4)
    assert layout.num_blocks == 0
    assert not patterns.make_pattern("fixed", 8, 2, "summary").mask(5).any()
