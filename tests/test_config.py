"""BlastConfig / LayerOverride: every field checked when the config is made, and the "auto" recipe rule."""
import math

import pytest

from blastfx import BlastConfig, LayerOverride
from blastfx.config import CALIBRATION_DAMPING, SEQUENTIAL_BELOW


@pytest.mark.parametrize("field,value", [
    ("iters", 0), ("iters", -1), ("iters", "10"), ("iters", True), ("iters", 2.5),
    ("probe_iters", 0), ("probe_iters", False), ("rank_multiple", 0), ("rank_multiple", 8.0),
    ("min_features", -1), ("min_features", "32"), ("min_features", True),
    ("tol", -1e-4), ("tol", math.nan), ("tol", math.inf), ("tol", "1e-4"), ("tol", True),
    ("calibration_damping", 0), ("calibration_damping", 0.0), ("calibration_damping", -0.01),
    ("calibration_damping", math.nan), ("calibration_damping", math.inf), ("calibration_damping", "0.01"),
    ("calibration_damping", True),
    ("progress", "no"), ("sequential", 1), ("allow_dense", None),
    ("blocks", 0), ("blocks", (4, 0)), ("blocks", True), ("block_choices", 4), ("block_choices", (4, 0)),
    ("include", (1,)), ("include", ""), ("exclude", ("",)), ("overrides", ["*"]),
    ("strategy", "fast"), ("objective", None), ("method", "svd"), ("init", "zeros"),
])
def test_bad_field_is_a_value_error_naming_it(field, value):
    with pytest.raises(ValueError, match=field):
        BlastConfig(**{field: value})


@pytest.mark.parametrize("field,value", [
    ("rank", 0), ("rank", -8), ("rank", "8"), ("rank", True), ("rank", 8.0),
    ("blocks", 0), ("blocks", (2, -1)), ("skip", "yes"), ("method", "svd"), ("structure", "ss2"),
    ("structure", 1),
])
def test_bad_override_field_is_a_value_error_naming_pattern_and_field(field, value):
    with pytest.raises(ValueError, match=field):
        LayerOverride(**{field: value})
    with pytest.raises(ValueError, match=r"overrides\['\*\.q_proj'\].*" + field):
        BlastConfig(overrides={"*.q_proj": {field: value}})


def test_structure_override_is_per_layer_and_refuses_a_size_of_another_structure():
    cfg = BlastConfig(structure="ss1", overrides={"*.mlp.*": {"structure": "blast"}, "*.down_proj": {"rank": 8},
                                                  "*.0.mlp.up_proj": LayerOverride(structure="auto")})
    assert cfg.structure_for("m.0.self_attn.q_proj") == "ss1"
    assert cfg.structure_for("m.0.mlp.down_proj") == "blast" and cfg.override_for("m.0.mlp.down_proj").rank == 8
    assert cfg.structure_for("m.0.mlp.up_proj") == "auto" and cfg.structure_for("m.1.mlp.up_proj") == "blast"
    assert cfg.structures_used() == {"ss1", "blast", "auto"}
    for fields, says in (({"structure": "ss1", "rank": 8}, "rank and blocks size a BLAST layer"),
                         ({"structure": "ss1", "blocks": 4}, "rank and blocks size a BLAST layer"),
                         ({"structure": "auto", "rank": 8}, "a fixed rank makes the layer BLAST")):
        with pytest.raises(ValueError, match=rf"overrides\['\*'\]: {says}"):
            BlastConfig(overrides={"*": fields})


def test_override_edited_after_it_was_made_is_checked_by_the_config():
    o = LayerOverride(rank=8)
    o.rank = 0
    with pytest.raises(ValueError, match=r"overrides\['\*'\].*rank"):
        BlastConfig(overrides={"*": o})
    with pytest.raises(ValueError, match=r"overrides\['\*'\].*rnk"):
        BlastConfig(overrides={"*": {"rnk": 8}})


def test_good_values_are_kept_and_normalized():
    import numpy as np
    cfg = BlastConfig(iters=np.int64(12), tol=0, min_features=0, calibration_damping=1e-6,
                      overrides={"*": {"rank": 16}})
    assert cfg.iters == 12 and type(cfg.iters) is int
    assert cfg.tol == 0.0 and cfg.min_features == 0 and cfg.calibration_damping == 1e-6
    assert cfg.overrides["*"] == LayerOverride(rank=16)
    assert BlastConfig().calibration_damping == CALIBRATION_DAMPING


def test_a_str_pattern_is_one_pattern_not_its_characters():
    cfg = BlastConfig(include="*.q_proj", exclude="model.layers.0.*")
    assert cfg.include == ("*.q_proj",) and cfg.exclude == ("model.layers.0.*",)
    assert cfg.selects("model.layers.1.self_attn.q_proj", True, 64)
    assert not cfg.selects("model.layers.0.self_attn.q_proj", True, 64)
    assert not cfg.selects("model.layers.1.self_attn.k_proj", True, 64)
    assert BlastConfig(include=["a", "b"]).include == ("a", "b")


@pytest.mark.parametrize("calibrated,loss,init,expected", [
    (True, True, "factorize", ("loss", "loss")),
    (True, False, "factorize", ("output", "uniform")),
    (False, False, "factorize", ("output", "uniform")),
    (True, True, "random", ("output", "uniform")),         # nothing is fitted: calibration unused
])
def test_auto_recipe_rule(calibrated, loss, init, expected):
    r = BlastConfig(init=init).resolved(calibrated=calibrated, returns_loss=loss)
    assert (r.objective, r.strategy) == expected


def test_explicit_recipe_is_kept():
    cfg = BlastConfig(objective="output", strategy="error", sequential=False)
    assert cfg.resolved(calibrated=True, returns_loss=True) is cfg
    half = BlastConfig(strategy="uniform").resolved(calibrated=True, returns_loss=True)
    assert (half.objective, half.strategy) == ("loss", "uniform")
    assert BlastConfig(sequential=True).resolved(calibrated=True, returns_loss=True, budget=0.9).sequential is True


@pytest.mark.parametrize("calibrated, init, budget, expected", [
    (True, "factorize", 0.5, True),         # where it pays: calibrated, at most SEQUENTIAL_BELOW kept
    (True, "factorize", SEQUENTIAL_BELOW, True),
    (True, "factorize", 0.8, False),        # one pass: the gain is small for twice the time
    (True, "factorize", None, False),       # no budget known: one pass
    (False, "factorize", 0.5, False),       # nothing to calibrate on
    (True, "random", 0.5, False),           # nothing is fitted
])
def test_auto_sequential_rule(calibrated, init, budget, expected):
    r = BlastConfig(init=init).resolved(calibrated=calibrated, returns_loss=True, budget=budget)
    assert r.sequential is expected


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_sequential_must_be_a_bool_or_auto(value):
    with pytest.raises(ValueError, match="sequential must be True, False or 'auto'"):
        BlastConfig(sequential=value)


def test_quantized_factors_are_refused_for_a_structure_that_has_none():
    """factor_dtype stores BLAST factors as codes; an SS1 layer has none, so asking for both is an
    error naming the clash, whether the config or an override asks (the "model" format is no ask)."""
    says = "factor_dtype='int8' stores BLAST factors quantized; 'ss1' layers have no quantized form"
    with pytest.raises(ValueError, match=says):
        BlastConfig(structure="ss1", factor_dtype="int8")
    with pytest.raises(ValueError, match=says):
        LayerOverride(structure="ss1", factor_dtype="int8")
    with pytest.raises(ValueError, match=r"overrides\['\*\.mlp\.\*'\]: " + says):
        BlastConfig(structure="ss1", overrides={"*.mlp.*": {"factor_dtype": "int8"}})
    BlastConfig(structure="ss1", overrides={"*.mlp.*": {"structure": "blast", "factor_dtype": "int8"}})
    BlastConfig(structure="ss1", overrides={"*.mlp.*": {"factor_dtype": "model"}})
    BlastConfig(structure="auto", factor_dtype="int8")      # its SS1 layers are noted in the plan


def test_planning_a_structure_without_codes_drops_factor_dtype_only_there():
    cfg = BlastConfig(structure="auto", factor_dtype="int4", overrides={"*.q_proj": {"factor_dtype": "int8"}})
    assert cfg.planning("blast").factor_dtype == "int4" and cfg.planning("blast").factor_dtype_for("a.q_proj") == "int8"
    assert cfg.planning("auto") is cfg
    ss1 = cfg.planning("ss1")
    assert ss1.structure == "ss1" and ss1.factor_dtype is None and ss1.factor_dtype_for("a.q_proj") is None
    assert cfg.factor_dtype == "int4" and cfg.overrides["*.q_proj"].factor_dtype == "int8"     # cfg itself unchanged
