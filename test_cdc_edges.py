"""Edges of cdc.py that the property tests in test_cdc.py do not reach: argument checks, unbatched
images, config normalisation. Each was found by mutation testing (bench/mutation.py): a change to the
code that every other test let pass."""

import pytest
import torch

import cdc


# ------------------------------------------------------------------------------------------------
#                                         Operators
# ------------------------------------------------------------------------------------------------


def test_operators_act_on_the_last_two_dims_of_unbatched_images():
    x = torch.randn(3, 4, 8, dtype=torch.float64)  # (C, H, W): H and W differ, so a swapped axis shows
    torch.testing.assert_close(cdc.down(x), cdc.down(x[None])[0], rtol=0, atol=0)
    torch.testing.assert_close(cdc.up(x, 2), cdc.up(x[None], 2)[0], rtol=0, atol=0)
    assert cdc.down(x).shape == (3, 2, 4) and cdc.up(x).shape == (3, 8, 16)


@pytest.mark.parametrize("shape", [(1, 1, 4, 5), (1, 1, 5, 4), (1, 5, 4), (1, 4, 6)])
def test_down_refuses_a_side_it_cannot_halve(shape):
    levels = 2 if shape[-1] == 6 else 1  # 6 halves once, not twice
    with pytest.raises(ValueError, match="cannot downsample"):
        cdc.down(torch.zeros(shape), levels)


@pytest.mark.parametrize("op", [cdc.down, cdc.up])
@pytest.mark.parametrize("levels", [-1, 1.0, "1"])
def test_operators_refuse_levels_that_are_not_non_negative_ints(op, levels):
    with pytest.raises(ValueError, match="non-negative int"):
        op(torch.zeros(1, 1, 4, 4), levels)


# ------------------------------------------------------------------------------------------------
#                                          Config
# ------------------------------------------------------------------------------------------------


def test_config_normalises_resolutions_to_a_tuple_of_ints():
    import numpy as np
    c = cdc.CDCConfig(resolutions=[np.int64(4), 8])
    assert c.resolutions == (4, 8) and type(c.resolutions) is tuple and all(type(r) is int for r in c.resolutions)
    assert hash(c) == hash(cdc.CDCConfig(resolutions=(4, 8)))       # frozen and hashable, like the tuple form
    assert cdc.CDCConfig(resolutions=(1, 2, 4)).K == 3                # a 1-pixel first stage is allowed


@pytest.mark.parametrize("res", [(), (0, 2), (-2, 4)])
def test_config_refuses_empty_or_non_positive_resolutions(res):
    with pytest.raises(ValueError, match="non-empty list of positive sides"):
        cdc.CDCConfig(resolutions=res)


@pytest.mark.parametrize("res", [(8, 8), (8, 8, 16), (4, 12), (4, 24)])
def test_config_refuses_repeated_or_non_power_of_two_steps(res):
    with pytest.raises(ValueError, match="power-of-two multiple"):
        cdc.CDCConfig(resolutions=res)


def test_config_normalises_windows_to_a_tuple_of_floats():
    c = cdc.CDCConfig(resolutions=(4, 8), windows=[0.25, 0.75])
    assert c.windows == (0.25, 0.75) and type(c.windows) is tuple and hash(c) is not None
    assert cdc.CDCConfig(resolutions=(4,), windows=[1]).windows == (1.0,)
    assert type(cdc.CDCConfig(resolutions=(4,), windows=[1]).windows[0]) is float


@pytest.mark.parametrize("windows", [(0.0, 1.0), (-0.5, 1.5), (0.5, 0.5, 0.0)])
def test_config_refuses_empty_or_negative_windows(windows):
    with pytest.raises(ValueError, match="positive widths summing to 1"):
        cdc.CDCConfig(resolutions=(4, 8) if len(windows) == 2 else (4, 8, 16), windows=windows)


def test_levels_between_stages_and_below_the_top():
    c = cdc.CDCConfig(resolutions=(16, 32, 128, 256))
    assert [c.levels(s) for s in range(4)] == [0, 1, 2, 1]            # stage 0 has no stage before it
    assert [c.levels_below_top(s) for s in range(4)] == [4, 3, 1, 0]


# ------------------------------------------------------------------------------------------------
#                                          Model config
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, words", [
    (dict(width=64, heads=6), "divisible by heads"),        # 64 = 6 * 10 + 4: not divisible (even quotient)
    (dict(width=36, heads=4), "even head dim"),             # head dim 9
    (dict(width=6, heads=1), "divisible by 4"),
    (dict(width=64.0), "positive int"),
    (dict(depth=0), "positive int"),
    (dict(num_classes=-1), "num_classes must be >= 0"),
    (dict(resolutions=(8, 12), patch_size=8), "not divisible by patch size"),
    (dict(fusion="cat"), "unknown fusion"),
])
def test_model_config_refuses(kw, words):
    with pytest.raises(ValueError, match=words):
        cdc.DiTConfig(**{**dict(depth=1, width=32, heads=2, patch_size=2, resolutions=(4, 8)), **kw})


def test_model_config_edge_values_are_allowed():
    c = cdc.DiTConfig(depth=1, width=4, heads=2, patch_size=1, in_channels=1, num_classes=0, freq_dim=1,
                      resolutions=(1, 2))
    assert (c.depth, c.width, c.num_classes, c.resolutions) == (1, 4, 0, (1, 2))
    model = cdc.DiT(cdc.DiTConfig(depth=1, width=8, heads=2, patch_size=1, in_channels=1, num_classes=0, resolutions=(2,)))
    assert model(torch.zeros(3, 1, 2, 2), torch.rand(3)).shape == (3, 1, 2, 2) and model.null_class == 0
