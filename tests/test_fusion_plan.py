"""Fusion plans: automatic grouping (runs, last-FFN rule, width / budget / dependency splits) and
validation of hand-edited plans (every error names its group and layer)."""

import json

import pytest

from export.fusion.plan import FusionPlan, PlanError, PlanOptions, propose_plan, width_limit
from export.spec import ModelSpec
from tests.conftest import EMPTY, LINEAR, ROPE, attn_only, ffn_only, full, hetero_spec


def spec_of(*layers) -> ModelSpec:
    return ModelSpec(hidden=64, heads=8, head_dim=8, vocab=99, layers=tuple(layers), rope_scaling=ROPE,
                     dtype="float32")


def test_default_plan_leaves_last_ffn_of_each_run():
    spec = hetero_spec()  # run: layers 2, 3, 4 (widths 256, 768, 2048)
    assert propose_plan(spec).groups == [(2, 3)]
    assert propose_plan(spec, PlanOptions(exclude_last=False)).groups == [(2, 4)]


def test_empty_blocks_inside_a_run_are_spanned_and_reported_dropped():
    spec = spec_of(full(2, 256), ffn_only(256), EMPTY, ffn_only(512), ffn_only(256), attn_only(1),
                   ffn_only(256), ffn_only(256))
    plan = propose_plan(spec)
    assert plan.groups == [(1, 3)]  # run 1,3,4 minus its last; run 6,7 minus its last is a single FFN
    (d,) = plan.derived
    assert d["ffn_layers"] == [1, 3] and d["dropped_empty_layers"] == [2] and d["fused_width"] == 768


def test_max_width_splits_into_fewest_then_most_balanced_groups():
    spec = spec_of(full(2, 256), *(ffn_only(w) for w in (512, 256, 256, 256, 256)), attn_only(1))
    plan = propose_plan(spec, PlanOptions(exclude_last=False, max_width=1024))
    # greedy would give [512,256,256] + [256,256] (widest 1024); balanced gives widest 768
    assert plan.groups == [(1, 2), (3, 5)]
    assert [d["fused_width"] for d in plan.derived] == [768, 768]


def test_budget_at_tp_is_a_width_limit():
    spec = spec_of(full(2, 256), *(ffn_only(512) for _ in range(5)), attn_only(1))
    per_width = 3 * 64 * 4  # fp32 bytes per unit of FFN width
    opts = PlanOptions(exclude_last=False, budget_bytes=per_width * 1024 // 2, tp=2)
    assert width_limit(spec, opts) == 1024
    plan = propose_plan(spec, opts)
    assert all(d["fused_width"] <= 1024 for d in plan.derived)
    assert plan.groups == [(1, 2), (3, 4)]  # the fifth FFN stays alone
    assert plan.derived[0]["fused_ffn_bytes_per_rank_tp2"] == per_width * 1024 // 2


def test_threshold_on_dependency_matrix_splits_dependent_blocks():
    spec = spec_of(full(2, 256), *(ffn_only(256) for _ in range(4)), attn_only(1))
    m = [[None] * 6 for _ in range(6)]
    for i in range(1, 5):
        for j in range(i + 1, 5):
            m[i][j] = 0.01
    m[2][3] = 0.5  # block 3 depends strongly on block 2
    plan = propose_plan(spec, PlanOptions(exclude_last=False, threshold=0.1), m)
    assert plan.groups == [(1, 2), (3, 4)]
    assert [d["max_dependency"] for d in plan.derived] == [0.01, 0.01]
    assert propose_plan(spec, PlanOptions(exclude_last=False, threshold=0.6), m).groups == [(1, 4)]


def test_threshold_without_matrix_is_an_error():
    with pytest.raises(Exception, match="needs the matrix"):
        propose_plan(hetero_spec(), PlanOptions(threshold=0.1))


def test_plan_json_round_trip_and_hand_edit(tmp_path):
    spec = hetero_spec()
    path = tmp_path / "plan.json"
    propose_plan(spec).save(path)
    data = json.loads(path.read_text())
    assert data["groups"] == [[2, 3]] and data["layers"] == 8 and data["options"]["exclude_last"] is True
    data["groups"] = [[2, 4]]
    data["derived"] = "stale notes are ignored"
    path.write_text(json.dumps(data))
    (g,) = FusionPlan.load(path).resolve(spec)
    assert (g.first, g.last, g.ffn_layers, g.fused_width) == (2, 4, (2, 3, 4), 256 + 768 + 2048)


@pytest.mark.parametrize("groups, message", [
    ([[1, 3]], "group 0 ([1, 3]): layer 1 has attention (A4/F512)"),
    ([[2, 3], [3, 4]], "groups 0 ([2, 3]) and 1 ([3, 4]) overlap at layer 3"),
    ([[2, 3], [4, 9]], "group 1 ([4, 9]): layer 9 is out of range (the model has 8 layers, 0-7)"),
    ([[-1, 3]], "group 0 ([-1, 3]): layer -1 is out of range"),
    ([[4, 4]], "group 0 ([4, 4]): holds 1 FFN block(s) [4]; a group needs at least 2"),
    ([[4, 2]], "group 0 ([4, 2]): first layer 4 is after last layer 2"),
    ([[4, 6]], "group 0 ([4, 6]): layer 5 has attention (A1/-)"),
    ([["a", 3]], 'group 0 (["a", 3]): must be [first, last]'),
])
def test_validation_errors_name_group_and_layer(groups, message):
    with pytest.raises(PlanError) as e:
        FusionPlan.from_json({"groups": groups}).resolve(hetero_spec())
    assert message in str(e.value)


def test_linear_ffn_and_all_problems_at_once():
    spec = spec_of(full(2, 256), ffn_only(256), LINEAR, ffn_only(256), EMPTY)
    with pytest.raises(PlanError) as e:
        FusionPlan([(1, 3), (3, 9)], layers=7).resolve(spec)
    text = str(e.value)
    assert "written for a model with 7 layers; this one has 5" in text
    assert "group 0 ([1, 3]): layer 2 has attention (L/L)" in text
    assert "group 1 ([3, 9]): layer 9 is out of range" in text
    assert len(e.value.problems) == 3


def test_plan_file_errors(tmp_path):
    with pytest.raises(PlanError, match="does not exist"):
        FusionPlan.load(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(PlanError, match="not valid JSON"):
        FusionPlan.load(tmp_path / "bad.json")
    with pytest.raises(PlanError, match="'groups' list"):
        FusionPlan.from_json({"groups": 3})
