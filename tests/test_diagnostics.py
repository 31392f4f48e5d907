"""Measurements that do not mean what they seem to: each problem is named in one line, in the
printout and in the JSON (metrics/diagnostics.py), and a sound run gets none."""
from __future__ import annotations

import json
import math

import pytest

import cal_transferability
from metrics import HEAD, LAYER, LayerResult, Transferability
from engine.checkpoint import run_files
from metrics.diagnostics import (BARELY_MOVED, DOMINANT, SATURATED_ACC, finetuning_problems, pretraining_problems,
                                 saturation_problems)
from utils import run_cli


def run(capsys, *argv):
    capsys.readouterr()
    status = run_cli(cal_transferability.main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def result_of(values, moves=None, cos=0.0):
    """A Transferability with the given T per layer (the head appended) and ft_move per layer."""
    moves = moves or [0.5] * len(values)
    layers = [LayerResult(f"l{i}", 1.0, 1.0 / t, t, LAYER, d_init=1.0, cos_init=cos, shrink=1.0, ft_move=m)
              for i, (t, m) in enumerate(zip(values, moves), 1)]
    layers.append(LayerResult("fc", None, None, 1.0, HEAD))
    return Transferability(tuple(layers), math.fsum(values) / len(values))


def kinds(problems):
    return [(p.kind, p.layer) for p in problems]


def test_a_sound_curve_has_no_problem():
    assert finetuning_problems(result_of([6.0, 90.0, 80.0, 27.0, 13.0, 10.0, 6.5, 9.5, 10.0, 10.0])) == []


def test_a_layer_fine_tuning_barely_moved_is_named_with_the_mean_without_it():
    moves = [0.5] * 10
    moves[2] = 0.5 * BARELY_MOVED / 3  # a third of the threshold
    values = [17.45, 208.08, 45305.95, 163.39, 20.0, 15.0, 12.0, 10.0, 9.0, 8.0]
    problems = finetuning_problems(result_of(values, moves))
    assert kinds(problems) == [("barely_moved", "l3")]
    without = math.fsum(values[:2] + values[3:]) / 9
    assert "l3: fine-tuning barely moved it" in problems[0].message
    assert f"the overall mean without it: {without:.2f}" in problems[0].message
    # at the threshold it is not flagged: the rule is a strict fraction of the median layer's move
    moves[2] = 0.5 * BARELY_MOVED * 1.01
    assert "barely_moved" not in [p.kind for p in finetuning_problems(result_of(values, moves))]


def test_a_layer_dominating_the_mean_is_named_once():
    values = [10.0] * 9 + [10.0 * DOMINANT * 1.5]
    assert kinds(finetuning_problems(result_of(values))) == [("dominant", "l10")]
    values[-1] = 10.0 * DOMINANT * 0.99
    assert finetuning_problems(result_of(values)) == []


def test_t_below_one_everywhere_means_not_descended_from_theta_a():
    problems = finetuning_problems(result_of([0.03, 0.02, 0.05, 0.9]))
    assert kinds(problems) == [("not_descended", None)]
    assert "not fine-tuned from -a" in problems[0].message
    # one layer at 1 or above: not this problem
    assert "not_descended" not in [p.kind for p in finetuning_problems(result_of([0.3, 0.2, 0.5, 1.0]))]


def test_pretraining_that_stayed_home_is_one_problem_for_all():
    assert kinds(pretraining_problems(result_of([2.0, 3.0], cos=0.9))) == [("stayed_home", None)]
    assert pretraining_problems(result_of([2.0, 3.0], cos=0.2)) == []


def write_log(path, accuracies):
    path.write_text("".join(json.dumps({"epoch": e, "val_acc": a}) + "\n" for e, a in enumerate(accuracies, 1)))


def test_a_saturated_target_is_read_from_the_fine_tuning_log(tmp_path):
    log = tmp_path / "b.log.jsonl"
    assert saturation_problems(log) == []  # no log: not judged
    write_log(log, [60.0, 90.0, 98.0, 100.0, 100.0, 100.0, 100.0])
    [problem] = saturation_problems(log)
    assert problem.kind == "saturated" and "100.0 % validation accuracy at epoch 4 of 7" in problem.message
    write_log(log, [60.0, SATURATED_ACC - 0.1])
    assert saturation_problems(log) == []
    log.write_text("not json\n")
    assert saturation_problems(log) == []


def perturbed_trio(make_tiny_trio, name, change):
    """The tiny trio with theta_FB replaced by change(trio) (a state dict)."""
    trio = make_tiny_trio(name)
    b = trio.save_b(trio.b, change(trio))
    return trio, b


def test_cli_names_a_from_scratch_theta_fb_in_printout_and_json(make_tiny_trio, capsys, tmp_path):
    # theta_FB trained from theta_r, not from theta_A: a small step from theta_r
    trio, b = perturbed_trio(make_tiny_trio, "scratch",
                             lambda t: {k: (v + 0.1 * t.delta[k] if k in t.delta else v) for k, v in t.theta_r.items()})
    out_json = tmp_path / "t.json"
    status, out, err = run(capsys, "-r", trio.r, "-a", trio.a, "-b", b, "--no_fig", "--json", out_json)
    assert status == 0, err
    lines = [line for line in out.splitlines() if line.startswith("warning: ")]
    assert len(lines) == 1 and "not fine-tuned from -a" in lines[0]
    data = json.loads(out_json.read_text())
    assert [w["kind"] for w in data["results"][0]["warnings"]] == ["not_descended"]
    assert [w["kind"] for w in data["warnings"]] == ["stayed_home"]  # the tiny trio's theta_A is near theta_r


def test_cli_names_a_layer_fine_tuning_did_not_move(make_tiny_trio, capsys, tmp_path):
    def barely(trio):
        layer = next(g for g in trio.groups if g.name == "layer1.1")
        return {k: (trio.theta_a[k] + 1e-5 * trio.delta[k] if k in layer.keys and k in trio.delta else v)
                for k, v in trio.theta_b.items()}

    trio, b = perturbed_trio(make_tiny_trio, "barely", barely)
    write_log(run_files(b)[2], [50.0, 100.0, 100.0])
    out_json = tmp_path / "t.json"
    status, out, err = run(capsys, "-r", trio.r, "-a", trio.a, "-b", b, "--no_fig", "--json", out_json)
    assert status == 0, err
    warned = [line for line in out.splitlines() if line.startswith("warning: ")]
    assert len(warned) == 2
    assert warned[0].startswith("warning: layer1.1: fine-tuning barely moved it")
    assert "at epoch 2 of 3" in warned[1]
    data = json.loads(out_json.read_text())
    assert [(w["kind"], w["layer"]) for w in data["results"][0]["warnings"]] == [
        ("barely_moved", "layer1.1"), ("saturated", None)]


def test_the_demo_checkpoints_have_no_problem(capsys, tmp_path):
    out_json = tmp_path / "demo.json"
    status, out, err = run(capsys, "--no_fig", "--json", out_json)
    assert status == 0, err
    assert "warning" not in out and "note" not in err
    data = json.loads(out_json.read_text())
    assert data["warnings"] == [] and all(r["warnings"] == [] for r in data["results"])


@pytest.mark.parametrize("values", [[1.5, 2.0, 2.5], [3.0, 3.0, 3.0, 3.0]])
def test_no_problem_on_modest_curves(values):
    assert finetuning_problems(result_of(values)) == []
