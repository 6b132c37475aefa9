"""Privacy sweep: runs, table, plot, resume and clear errors (a few steps per run)."""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

from tests.helpers.experiments import import_experiment

sweep = import_experiment("experiments.privacy_sweep")

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = sweep.SweepSettings(num_epochs=1.0, max_steps=2, width=0.125)
EPSILONS = (8.0, math.inf)


def _check_outputs(workdir: pathlib.Path, methods: tuple[str, ...]) -> list[dict]:
  table = json.loads((workdir / "privacy_sweep.json").read_text())
  rows = table["rows"]
  assert [(r["method"], r["epsilon_target"]) for r in rows] == [
      (m, e) for m in methods for e in EPSILONS]
  for r in rows:
    assert set(sweep.ROW_KEYS) <= set(r)
    assert 0.0 <= r["test_accuracy"] <= 1.0 and r["steps"] == 2 and r["wall_seconds"] > 0
    assert (workdir / sweep.run_name(r["method"], r["epsilon_target"]) / "summary.json").exists()
    if math.isinf(r["epsilon_target"]):
      assert math.isinf(r["epsilon_achieved"]) and r["noise_multiplier"] == 0.0
    else:
      assert 8.0 - 1e-3 <= r["epsilon_achieved"] <= 8.0 and r["noise_multiplier"] > 0
  png = (workdir / "privacy_sweep.png").read_bytes()
  assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
  return rows


@pytest.mark.slow  # ~2 min: two real trainings per method; the pieces have fast tests
def test_sweep_writes_table_and_plot_and_resumes(tmp_path):
  methods = ("asymml", "dpsgd")
  lines: list[str] = []
  rows = sweep.run_sweep(epsilons=EPSILONS, methods=methods, workdir=str(tmp_path),
                         settings=TINY, log=lines.append)
  assert _check_outputs(tmp_path, methods) == json.loads(json.dumps(rows))
  assert {"asymml_eps8", "dpsgd_eps8", "asymml_epsinf", "dpsgd_epsinf"} <= set(
      os.listdir(tmp_path))
  assert any(l.startswith("method") and "test acc" in l for l in lines)  # the final table
  # Resume: nothing is retrained, the table is the same.
  again: list[str] = []
  assert sweep.run_sweep(epsilons=EPSILONS, methods=methods, workdir=str(tmp_path),
                         settings=TINY, log=again.append) == rows
  assert sum("reusing" in l for l in again) == 4
  assert not any(l.startswith("step ") for l in again)


def test_table_survives_an_interruption_and_resume_finishes_it(tmp_path, monkeypatch):
  calls: list[str] = []

  def fake_run_one(method, epsilon, run_dir, settings, *, log=print):
    calls.append(sweep.run_name(method, epsilon))
    if len(calls) == 3:
      raise KeyboardInterrupt
    summary = {"epsilon": epsilon, "test_accuracy": 0.5, "steps": 7, "wall_seconds": 1.0,
               "privacy": {"noise_multiplier": 0.0 if math.isinf(epsilon) else 1.5}}
    os.makedirs(run_dir, exist_ok=True)
    (pathlib.Path(run_dir) / "summary.json").write_text(json.dumps(summary))
    return summary

  monkeypatch.setattr(sweep, "run_one", fake_run_one)
  kwargs = dict(epsilons=(1.0, 2.0, math.inf), methods=("asymml",), workdir=str(tmp_path),
                settings=TINY, log=lambda _: None)
  with pytest.raises(KeyboardInterrupt):
    sweep.run_sweep(**kwargs)
  table = json.loads((tmp_path / "privacy_sweep.json").read_text())
  assert [r["epsilon_target"] for r in table["rows"]] == [1.0, 2.0]  # nothing lost
  assert table["rows"][0]["noise_multiplier"] == 1.5  # read from summary["privacy"]
  rows = sweep.run_sweep(**kwargs)
  assert calls == ["asymml_eps1", "asymml_eps2", "asymml_epsinf", "asymml_epsinf"]
  assert [r["epsilon_target"] for r in rows] == [1.0, 2.0, math.inf]
  # --noresume retrains everything from an empty run folder.
  (tmp_path / "asymml_eps1" / "stale").write_text("x")
  sweep.run_sweep(**kwargs, resume=False)
  assert calls[4:] == ["asymml_eps1", "asymml_eps2", "asymml_epsinf"]
  assert not (tmp_path / "asymml_eps1" / "stale").exists()


@pytest.mark.parametrize("text,want", [
    ("1,2,4,8,inf", (1.0, 2.0, 4.0, 8.0, math.inf)),
    (" 0.5 , inf ", (0.5, math.inf)),
])
def test_parse_epsilons(text, want):
  assert sweep.parse_epsilons(text) == want


@pytest.mark.parametrize("text,match", [
    ("", "at least one"), ("0", "> 0"), ("-1", "> 0"), ("nan", "> 0"), ("one", "not a number"),
    ("2,2", "twice"),
])
def test_parse_epsilons_refusals(text, match):
  with pytest.raises(ValueError, match=match):
    sweep.parse_epsilons(text)


def test_parse_methods_and_names():
  assert sweep.parse_methods("dpsgd, asymml") == ("dpsgd", "asymml")
  with pytest.raises(ValueError, match="unknown method 'sgd'; choices: asymml, dpsgd"):
    sweep.parse_methods("sgd")
  assert sweep.run_name("asymml", math.inf) == "asymml_epsinf"
  assert sweep.run_name("dpsgd", 0.5) == "dpsgd_eps0.5"
  cfg = sweep.dpsgd_config(math.inf, TINY)
  assert cfg.noise_multiplier == 0 and cfg.target_epsilon is None and cfg.norm == "group"
  assert sweep.dpsgd_config(2.0, TINY).target_epsilon == 2.0


def test_cli_bad_epsilon_is_a_clear_error(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, "-m", "experiments.privacy_sweep", "--epsilons=0,inf",
                      "--methods=dpsgd", f"--workdir={tmp_path / 'w'}"], cwd=ROOT, env=env,
                     text=True, capture_output=True, timeout=120)
  assert p.returncode != 0
  assert "each epsilon must be > 0 or inf" in p.stderr and "Traceback" not in p.stderr
  assert not (tmp_path / "w").exists()
