import pytest

from blastfx.structures.blast.layout import BlastShape, normalize_blocks


def test_counts_match_the_paper_formula_when_unpadded():
    s = BlastShape.make(4096, 4096, 1024, 16)
    assert s.num_params == 1024 * (4096 + 4096 + 256)
    assert (s.p, s.q, s.padded) == (256, 256, False)


def test_padding_is_counted_as_stored():
    s = BlastShape.make(10, 7, 3, (4, 2), allow_larger=True)
    assert (s.p, s.q, s.m_pad, s.n_pad) == (3, 4, 12, 8)
    assert s.num_params == 3 * (12 + 8 + 8)


@pytest.mark.parametrize("kwargs,match", [
    (dict(rank=0), "rank"), (dict(rank=-2), "rank"), (dict(blocks=(0, 2)), "b_out"),
    (dict(blocks=(2, -1)), "b_in"), (dict(blocks="x"), "blocks"), (dict(rank=40), "more than the dense"),
    (dict(blocks=(4, 4), out=5), "entirely padding"), (dict(blocks=(33, 1), out=32), "larger than"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BlastShape.make(kwargs.get("out", 32), 32, kwargs.get("rank", 4), kwargs.get("blocks", 2))


def test_allow_larger():
    assert BlastShape.make(32, 32, 40, 2, allow_larger=True).num_params > 32 * 32
    assert normalize_blocks(3) == (3, 3)
