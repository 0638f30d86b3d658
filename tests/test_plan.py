"""The ablation plan: spec parsing with exact layer indices, validation, YAML round trip, MTP default."""

import math

import pytest

from abliterate.config import Ablation
from abliterate.edit.plan import AblationPlan, build_plan, parse_layers, parse_scale, parse_targets
from abliterate.errors import AbliterateError
from abliterate.vocabulary import DEFAULT_TARGETS


def test_layer_specs_are_exact_indices():
    assert parse_layers("all", 5) == (0, 1, 2, 3, 4)
    assert parse_layers("10-12", 46) == (10, 11, 12)
    assert parse_layers("5,7,9-12", 46) == (5, 7, 9, 10, 11, 12)
    assert parse_layers(" 3 , 1, 1-2 ", 46) == (1, 2, 3)
    assert parse_layers("1", 46) == (1,)  # never 10-19


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("46", "out of range"),
        ("40-50", "out of range"),
        ("12-10", "backwards"),
        ("a", "cannot read"),
        ("", "cannot read"),
        ("-1", "cannot read"),
        ("1,,2", "cannot read"),
    ],
)
def test_bad_layer_specs_fail(spec, fragment):
    with pytest.raises(AbliterateError, match=fragment):
        parse_layers(spec, 46)


def test_scale_specs():
    assert parse_scale("0.5", (1, 2)) == ((0.5, 0.5), 0.5)
    assert parse_scale("1,0.5,0", (3, 4, 5)) == ((1.0, 0.5, 0.0), 1.0)
    values, embed = parse_scale("gauss:center=20,width=5,peak=1.0", (15, 20, 25))
    assert values[1] == 1.0 and values[0] == values[2] == pytest.approx(math.exp(-0.5))
    assert embed == pytest.approx(math.exp(-0.5 * 16))
    values, _ = parse_scale("gauss:center=0,width=1,peak=1,floor=0.25", (0, 100))
    assert values == (1.0, 0.25)


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("-0.1", r"outside \[0, 2"),
        ("2.5", r"outside \[0, 2"),
        ("nan", "not finite"),
        ("inf", "not finite"),
        ("x", "not a number"),
        ("1,1", "one value per target layer"),
        ("gauss:center=1", "lacks width"),
        ("gauss:center=1,width=0", "width must be positive"),
        ("gauss:middle=1,width=2", "cannot read"),
        ("gauss:center=1,width=2,peak=3", r"outside \[0, 2"),
    ],
)
def test_bad_scales_fail(spec, fragment):
    with pytest.raises(AbliterateError, match=fragment):
        parse_scale(spec, (1, 2, 3))


def test_targets():
    assert parse_targets("default") == DEFAULT_TARGETS
    assert parse_targets("default,embed") == DEFAULT_TARGETS + ("embed",)
    assert parse_targets("router,router") == ("router",)
    for bad in ("lm_head", "attn_in", "o_proj", "mtp"):
        with pytest.raises(AbliterateError, match="unknown or unsupported target role"):
            parse_targets(bad)
    with pytest.raises(AbliterateError, match="empty"):
        parse_targets([])


def test_mtp_is_ablated_like_the_last_layer_by_default():
    plan = build_plan(46, [46], Ablation(layers="all", scale="gauss:center=45,width=3,peak=0.8"), "auto")
    assert plan.layers == tuple(range(47)) and plan.mtp == "ablate"
    assert plan.scale_for(46) == plan.scale_for(45) == pytest.approx(0.8)
    # last layer not targeted: nor MTP
    assert build_plan(46, [46], Ablation(layers="0-44"), "auto").layers == tuple(range(45))
    assert build_plan(46, [46], Ablation(mtp="skip"), "auto").layers == tuple(range(46))


def test_positions():
    own = build_plan(4, [4], Ablation(), "own")
    assert [own.position_for(i) for i in (None, 0, 3, 4)] == [0, 0, 3, 4]
    assert build_plan(4, [], Ablation(), "2").position_for(1) == 2
    selected = build_plan(4, [], Ablation(), "auto", selected_position=3)
    assert selected.position_for(0) == 3
    with pytest.raises(AbliterateError, match="records no selected position"):
        build_plan(4, [], Ablation(), "auto").position_for(0)
    with pytest.raises(AbliterateError, match="direction position"):
        build_plan(4, [], Ablation(), "-1")


def test_the_configured_auto_is_the_plans_selected_position():
    """One concept, one record: the configuration's `auto` and the plan's `selected` make one plan."""
    auto = build_plan(4, [], Ablation(), "auto", selected_position=2)
    assert auto == build_plan(4, [], Ablation(), "selected", selected_position=2)
    assert auto.direction_position == "auto" and auto.to_dict()["direction_position"] == "auto"


def test_the_plan_takes_every_ablation_setting():
    ablation = Ablation(
        layers="1-2",
        scale="0.5",
        targets=["attn_out"],
        ablation_method="norm_preserving",
        mtp="skip",
        biases=True,
    )
    plan = build_plan(3, [3], ablation, "own")
    assert (plan.layers, plan.scales, plan.targets) == ((1, 2), (0.5, 0.5), ("attn_out",))
    assert (plan.method, plan.mtp, plan.biases) == ("norm_preserving", "skip", True)
    assert (plan.layer_spec, plan.scale_spec) == ("1-2", "0.5")


def test_yaml_and_dict_round_trip():
    plan = build_plan(
        46,
        [46],
        Ablation(
            layers="5,7,9-12",
            scale="1,1,0.5,0.5,0.25,0",
            targets=["default", "embed"],
            ablation_method="norm_preserving",
            biases=True,
        ),
        "own",
    )
    assert AblationPlan.from_yaml(plan.to_yaml()) == plan
    assert AblationPlan.from_dict(plan.to_dict()) == plan
    data = plan.to_dict()
    assert data["layers"] == [5, 7, 9, 10, 11, 12]
    assert data["scale"] == {"5": 1.0, "7": 1.0, "9": 0.5, "10": 0.5, "11": 0.25, "12": 0.0}
    assert plan.roles() == DEFAULT_TARGETS + (
        "embed",
        "attn_out_bias",
        "mlp_down_bias",
        "expert_down_bias",
        "shared_expert_down_bias",
    )
    # The specs as typed do not change what the plan does.
    assert AblationPlan.from_dict({**data, "layer_spec": "other"}).sha256() == plan.sha256()
    assert AblationPlan.from_dict({**data, "method": "plain"}).sha256() != plan.sha256()


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"method": "magic"}, "unknown method"),
        ({"mtp": "maybe"}, "unknown MTP mode"),
        ({"targets": []}, "no target roles"),
        ({"targets": ["lm_head"]}, "unsupported target role"),
        ({"layers": [2, 1], "scale": {"1": 1, "2": 1}}, "sorted"),
        ({"scale": {"0": 1.0}}, "differ from"),
        ({"colour": "red"}, "unknown ablation plan keys"),
        ({"scale": {"0": 3.0, "1": 1.0}}, r"outside \[0, 2"),
        ({"direction_position": True}, "direction position"),
        ({"format": 9}, "format 9"),
    ],
)
def test_invalid_plans_fail(change, fragment):
    data = {**build_plan(2, [], Ablation(), "auto").to_dict(), **change}
    with pytest.raises(AbliterateError, match=fragment):
        AblationPlan.from_dict(data)


def test_yaml_errors_are_clear():
    with pytest.raises(AbliterateError, match="not valid YAML"):
        AblationPlan.from_yaml("layers: [1, 2")
    with pytest.raises(AbliterateError, match="must be a mapping"):
        AblationPlan.from_yaml("- 1")
