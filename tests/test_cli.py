"""The command line: help, and the demo end to end (the README's first command)."""

from __future__ import annotations

import subprocess
import sys

import optuna
import pytest
import torch

import fxsketch


def _cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fxsketch.cli", *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd)


def test_help_lists_commands():
    proc = _cli("--help")
    assert proc.returncode == 0, proc.stderr
    assert "demo" in proc.stdout
    proc = _cli("demo", "--help")
    assert proc.returncode == 0 and "--trials" in proc.stdout


def test_demo_trains_optimizes_and_saves(tmp_path):
    out = tmp_path / "demo.pt2"
    proc = _cli("demo", "--trials", "9", "--objective", "flops", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    assert "dense accuracy" in text and "trial   0" in text and "MFLOPs before" in text
    assert out.exists()
    summary = text[text.index("accuracy     dense"):].splitlines()[0]
    dense, optimized = [float(w) for w in summary.replace("->", " ").split() if w.replace(".", "").isdigit()][:2]
    assert optimized >= dense - 0.01 - 1e-6
    loaded = fxsketch.load(out)
    assert loaded(torch.rand(5, 64)).shape == (5, 10)


TARGET = '''
import optuna
import pytest
import torch

from torch import nn

torch.manual_seed(0)
X = torch.randn(64, 16)
MODEL = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)).eval()
with torch.no_grad():
    for layer in (MODEL[0], MODEL[2]):
        out, inp = layer.weight.shape
        layer.weight.copy_(torch.randn(out, 4) @ torch.randn(4, inp) / inp ** 0.5)
    REF = MODEL(X).argmax(1)


def model():
    return MODEL, X


def accuracy(m):
    with torch.no_grad():
        return (m(X).argmax(1) == REF).float().mean().item()


def calibration():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(32, 16, generator=g),) for _ in range(4)]


EMPTY = []


def broken():
    raise RuntimeError("weights file missing")


def bad_accuracy(m):
    raise KeyError("labels")


CALLS = []


def interrupting_accuracy(m):
    """Ctrl-C during the fourth evaluation (the first is the dense model's)."""
    CALLS.append(1)
    if len(CALLS) == 4:
        raise KeyboardInterrupt
    return accuracy(m)


def interrupting_at_once(m):
    """Ctrl-C during the first trial."""
    CALLS.append(1)
    if len(CALLS) == 2:
        raise KeyboardInterrupt
    return accuracy(m)
'''


def _runner_invoke(*args):
    from typer.testing import CliRunner

    from fxsketch.cli import app

    return CliRunner().invoke(app, list(args))


def _project(tmp_path):
    (tmp_path / "target.py").write_text(TARGET)
    spec = tmp_path / "spec.json"
    spec.write_text('{"layers": [{"layer_names": {"type": "Linear", "range": [0, 2]}, "params": "auto"}]}')
    return f"{tmp_path / 'target.py'}:model", str(spec), f"{tmp_path / 'target.py'}:accuracy"


def test_inspect_marks_what_the_spec_selects(tmp_path):
    target, spec, _ = _project(tmp_path)
    result = _runner_invoke("inspect", target, "--spec", spec)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    selected = [line for line in lines if "selected" in line and "Linear" in line]
    assert len(selected) == 2 and "64×16" in selected[0] and "64×64" in selected[1]
    assert any("4×64" in line and "selected" not in line for line in lines)
    assert "2 of 3 matchable layers selected" in result.output


def test_optimize_then_apply_reproduces_the_model(tmp_path):
    target, spec, accuracy = _project(tmp_path)
    out, plan, report = tmp_path / "m.pt2", tmp_path / "plan.json", tmp_path / "report.html"
    result = _runner_invoke("optimize", target, "--spec", spec, "--accuracy", accuracy, "--threshold", "0.9",
                            "--trials", "6", "--objective", "flops", "--seed", "0", "--out", str(out),
                            "--plan-out", str(plan), "--report", str(report))
    assert result.exit_code == 0, result.output
    assert "MFLOPs before" in result.output
    assert out.exists() and plan.exists() and report.read_text().startswith("<!doctype html>")
    applied = tmp_path / "applied.pt2"
    result = _runner_invoke("apply", target, "--plan", str(plan), "--out", str(applied))
    assert result.exit_code == 0, result.output
    x = torch.randn(9, 16)
    torch.testing.assert_close(fxsketch.load(applied)(x), fxsketch.load(out)(x))


def test_user_code_errors_show_the_traceback_and_exit_non_zero(tmp_path):
    target, spec, _ = _project(tmp_path)
    broken = target.replace(":model", ":broken")
    result = _runner_invoke("inspect", broken)
    assert result.exit_code == 1
    assert "weights file missing" in result.output
    assert 'raise RuntimeError("weights file missing")' in result.output  # the user's own line, from the traceback
    bad_acc = target.replace(":model", ":bad_accuracy")
    result = _runner_invoke("optimize", target, "--spec", spec, "--accuracy", bad_acc, "--trials", "2",
                            "--objective", "flops")
    assert result.exit_code == 1 and "labels" in result.output


def test_bad_references_are_usage_errors(tmp_path):
    result = _runner_invoke("inspect", "no_colon_here")
    assert result.exit_code == 2 and "path/to/file.py:callable" in result.output
    result = _runner_invoke("inspect", f"{tmp_path / 'missing.py'}:model")
    assert result.exit_code == 2 and "no such file" in result.output


def test_every_command_has_help():
    for command in ("inspect", "optimize", "apply", "demo"):
        result = _runner_invoke(command, "--help")
        assert result.exit_code == 0 and "Usage" in result.output


def test_optimize_with_two_workers(tmp_path):
    target, spec, accuracy = _project(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "fxsketch.cli", "optimize", target, "--spec", spec,
                           "--accuracy", accuracy, "--threshold", "0.9", "--trials", "4", "--objective", "flops",
                           "--workers", "2", "--storage", f"sqlite:///{tmp_path / 'w.db'}", "--study-name", "w"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "trials       4 (" in proc.stdout


def test_optimize_with_calibration_and_budgets_then_apply(tmp_path):
    target, _, accuracy = _project(tmp_path)
    calib = f"{tmp_path / 'target.py'}:calibration"
    spec = tmp_path / "whitened.json"
    spec.write_text('{"layers": [{"layer_names": {"type": "Linear", "range": [0, 2]}, '
                    '"params": {"method": ["whitened_svd"], "low_rank": [2, 4, 8, 16]}}]}')
    out, plan = tmp_path / "m.pt2", tmp_path / "plan.json"
    result = _runner_invoke("optimize", target, "--spec", str(spec), "--accuracy", accuracy, "--threshold", "0.9",
                            "--trials", "6", "--objective", "flops", "--seed", "0", "--calibration", calib,
                            "--max-flops", "0.5", "--out", str(out), "--plan-out", str(plan))
    assert result.exit_code == 0, result.output
    import json

    entries = json.loads(plan.read_text())
    entries = entries.get("plan", entries)
    assert entries and all(e["method"] == "whitened_svd" for e in entries.values())
    # whitened factors depend on the calibration data: the plan carries them, so apply needs none
    applied = tmp_path / "applied.pt2"
    result = _runner_invoke("apply", target, "--plan", str(plan), "--out", str(applied))
    assert result.exit_code == 0, result.output
    x = torch.randn(9, 16)
    assert torch.equal(fxsketch.load(applied)(x), fxsketch.load(out)(x))
    (tmp_path / "plan.factors.pt").unlink()  # without them, the calibration data is needed again
    result = _runner_invoke("apply", target, "--plan", str(plan), "--out", str(tmp_path / "bad.pt2"))
    assert result.exit_code == 2 and "factors" in result.output


def test_bad_calibration_and_budget_options(tmp_path):
    target, spec, accuracy = _project(tmp_path)
    empty = f"{tmp_path / 'target.py'}:EMPTY"
    result = _runner_invoke("optimize", target, "--spec", spec, "--accuracy", accuracy, "--calibration", empty)
    assert result.exit_code == 2 and "no calibration batches" in result.output
    result = _runner_invoke("optimize", target, "--spec", spec, "--accuracy", accuracy, "--max-flops", "-1")
    assert result.exit_code != 0 and "--max-flops" in result.output


def test_ctrl_c_saves_the_best_plan_then_exits_130_with_a_resume_hint_in_cli_flags(tmp_path):
    target, spec, accuracy = _project(tmp_path)
    plan, db = tmp_path / "plan.json", tmp_path / "study.db"
    storage = f"sqlite:///{db}"
    proc = _cli("optimize", target, "--spec", spec, "--accuracy", accuracy.replace(":accuracy", ":interrupting_accuracy"),
                "--threshold", "0.9", "--trials", "8", "--objective", "flops", "--seed", "0", "--plan-out", str(plan),
                "--storage", storage, "--study-name", "s1", cwd=tmp_path)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 130, text
    assert plan.exists() and "plan written to" in text
    assert "interrupted" in text and f"--storage {storage} --study-name s1" in text
    assert "load_if_exists" not in text and "storage=" not in text  # the API's keywords are not the CLI's flags
    assert fxsketch.load_plan(plan)  # the best plan so far


def test_ctrl_c_before_any_trial_finished_exits_130_and_says_how_to_make_it_resumable(tmp_path):
    target, spec, accuracy = _project(tmp_path)
    proc = _cli("optimize", target, "--spec", spec, "--accuracy", accuracy.replace(":accuracy", ":interrupting_at_once"),
                "--threshold", "0.9", "--trials", "8", "--objective", "flops", cwd=tmp_path)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 130, text
    assert "before any trial finished" in text and "--storage sqlite:///study.db --study-name" in text
    assert "storage=" not in text


def test_a_targets_neighbours_never_shadow_the_standard_library_or_installed_packages(tmp_path):
    target, _, _ = _project(tmp_path)
    marker = tmp_path / "ran"
    (tmp_path / "yaml.py").write_text(f"open({str(marker)!r}, 'w').close()\n")  # an attacker's (or a careless) file
    (tmp_path / "spec.yaml").write_text("layers:\n  - layer_names: {type: Linear, range: [0, 2]}\n    params: auto\n")
    proc = _cli("inspect", target, "--spec", str(tmp_path / "spec.yaml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 of 3 matchable layers selected" in proc.stdout and not marker.exists()


def test_a_target_named_like_a_standard_module_is_a_clear_usage_error(tmp_path):
    (tmp_path / "copy.py").write_text(TARGET)
    proc = _cli("inspect", f"{tmp_path / 'copy.py'}:model")
    assert proc.returncode == 2
    assert "named like the module 'copy' Python already imports" in proc.stdout + proc.stderr
    assert "rename the file" in proc.stdout + proc.stderr


MISTAKES = {  # a spec the user got wrong, and what the message must say
    "a selector that matches nothing": ('{"layers": [{"layer_names": "nomatch", "params": {"low_rank": [4]}}]}',
                                        "matched no layer"),
    "an empty range": ('{"layers": [{"layer_names": "0", "params": {"low_rank": '
                       '{"type": "int", "low": 128, "high": 8}}}]}', "low <= high"),
    "an unknown method": ('{"layers": [{"layer_names": "0", "params": {"method": ["nosuch"]}}]}',
                          "unknown replacement method 'nosuch'"),
}


def test_a_users_own_mistake_prints_its_message_once_and_exits_2(tmp_path):
    target, _, accuracy = _project(tmp_path)
    for case, (text, message) in MISTAKES.items():
        spec = tmp_path / "mistake.json"
        spec.write_text(text)
        proc = _cli("optimize", target, "--spec", str(spec), "--accuracy", accuracy, "--trials", "2")
        output = proc.stdout + proc.stderr
        assert proc.returncode == 2, (case, output)
        assert output.count(message) == 1, (case, output)
        assert "Traceback" not in output and "searching" not in output, (case, output)
        assert len(output.strip().splitlines()) <= 4, (case, output)
    verbose = _cli("-v", "optimize", target, "--spec", str(spec), "--accuracy", accuracy, "--trials", "2")
    assert verbose.returncode == 1 and "Traceback" in verbose.stdout + verbose.stderr


def test_the_demo_without_its_extra_prints_just_how_to_install_it(tmp_path):
    script = ("import sys; sys.modules['sklearn'] = None; sys.argv = ['fxsketch', 'demo']; "
              "from fxsketch.cli import main; main()")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert "pip install 'fxsketch[demo]'" in output and "Traceback" not in output


def test_trial_lines_name_the_unit_and_summarize_whole_model_plans(capsys):
    from fxsketch import study_format as keys
    from fxsketch.search.progress import print_trial

    def finished(attrs):
        return optuna.trial.create_trial(value=1.0, user_attrs={keys.ACCURACY: 0.99, keys.SPEED: 1.5, **attrs})

    plan = {f"encoder.layer.{i}.fc": {"method": "svd", "low_rank": 8} for i in range(36)}
    print_trial(None, finished({keys.UNIT: keys.WHOLE_MODEL, keys.ENTRY: plan, keys.PLAN: plan, keys.FLOPS: 0.5}))
    print_trial(None, finished({keys.UNIT: "0", keys.ENTRY: {"method": "svd", "low_rank": 8}}))
    whole, layer = capsys.readouterr().out.splitlines()
    assert "whole model [whole-model plan, 36 layers, FLOPs 0.50×]" in whole and len(whole) < 160
    assert "layer 0 [method=svd, low_rank=8]" in layer


PROGRESS_SCRIPT = """
import sys, torch
from torch import nn
import fxsketch
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4)).eval()
x = torch.randn(32, 16)
fxsketch.optimize(model, fxsketch.LayerConfig({"type": "Linear"}, params={"low_rank": [2, 4, 8]}), example_inputs=x,
                  accuracy_fn=lambda m: 1.0, n_trials=4, search=fxsketch.SearchOptions(objective="flops", seed=0),
                  progress=sys.argv[1] == "on")
"""


def test_optimize_shows_a_progress_bar_when_asked_and_nothing_when_not():
    import os

    env = {**os.environ, "FORCE_COLOR": "1", "COLUMNS": "200"}  # rich draws for a terminal
    runs = {flag: subprocess.run([sys.executable, "-c", PROGRESS_SCRIPT, flag], capture_output=True, text=True,
                                 timeout=300, env=env) for flag in ("on", "off")}
    assert all(run.returncode == 0 for run in runs.values()), runs
    shown = runs["on"].stderr
    assert "layer 0" in shown or "layer 2" in shown, shown
    assert "/4" in shown and "best" in shown, shown
    quiet = runs["off"].stderr  # the log's warnings only
    assert "/4" not in quiet and "best" not in quiet and "capturing" not in quiet, quiet


LEAFSPEC_SCRIPT = """
import sys, torch
if sys.argv[1] == "with":
    import fxsketch
model = torch.nn.Sequential(torch.nn.Linear(4, 4))
torch.export.export(model, (torch.randn(2, 4),)).run_decompositions()
"""


def test_torchs_leafspec_deprecation_does_not_leak_into_fxsketch_runs():
    runs = {how: subprocess.run([sys.executable, "-W", "default", "-c", LEAFSPEC_SCRIPT, how], capture_output=True,
                                text=True, timeout=300) for how in ("with", "without")}
    assert "LeafSpec" not in runs["with"].stderr, runs["with"].stderr
    if "LeafSpec" not in runs["without"].stderr:
        pytest.skip("this torch no longer warns about LeafSpec: nothing to keep out")
