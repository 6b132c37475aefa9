"""Training loop: config validation, summary, checkpoint/resume after Ctrl-C."""

from __future__ import annotations

import json
import os

import pytest

from asymml_jax import train
from asymml_jax.decomposition import DecompositionConfig

BASE = dict(model="vgg11", width=0.125, dataset="mnist5k", backend="inline", batch_size=32,
            num_epochs=0.05, log_every=2, checkpoint_every=100, eval_batch_size=250,
            warmup_steps=2, decomposition=DecompositionConfig(rank_fraction=0.25))


@pytest.mark.parametrize("field,value,match", [
    ("batch_size", 0, "batch_size"),
    ("learning_rate", -1.0, "learning_rate"),
    ("model", "alexnet", "model must be one of"),
    ("norm", "layer", "norm must be one of"),
    ("num_epochs", 0, "num_epochs"),
    ("optimizer", "lbfgs", "optimizer"),
])
def test_config_out_of_range_is_refused(field, value, match):
  with pytest.raises(ValueError, match=match):
    train.TrainConfig(**{**BASE, field: value})


def test_unknown_config_key_is_refused():
  with pytest.raises(ValueError, match="unknown keys"):
    train.TrainConfig.from_config({"model": "vgg11", "learnin_rate": 0.1})


def test_bad_config_writes_nothing(tmp_path):
  workdir = tmp_path / "w"
  with pytest.raises(ValueError, match="data_dir"):
    train.train_and_evaluate({**BASE, "dataset": "cifar10"}, str(workdir))
  assert not workdir.exists()


def test_interrupted_run_resumes_to_the_same_result(tmp_path):
  lines_a: list[str] = []
  a = train.train_and_evaluate(train.TrainConfig(**BASE), str(tmp_path / "a"),
                               log=lines_a.append)
  assert a["steps"] == 7 and a["backend"] == "inline"
  on_disk = json.loads((tmp_path / "a" / "summary.json").read_text())
  for key in ("backend", "model", "test_accuracy", "steps", "wall_seconds", "plan"):
    assert key in on_disk
  assert any("examples/s" in l for l in lines_a)
  # Inference from the checkpoint reproduces the held-out evaluation.
  inf = train.evaluate_checkpoint(train.TrainConfig(**BASE), str(tmp_path / "a"), log=lambda _: None)
  assert inf["step"] == 7 and inf["count"] == 500
  assert inf["accuracy"] == pytest.approx(a["test_accuracy"])
  assert len(inf["latency_s"]) == 2  # 500 examples in batches of 250
  with pytest.raises(FileNotFoundError, match="no checkpoints"):
    train.evaluate_checkpoint(train.TrainConfig(**BASE), str(tmp_path / "nothing"))

  def interrupt_at_step_4(line: str):
    if line.startswith("step 4/"):
      raise KeyboardInterrupt
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(train.TrainConfig(**BASE), str(tmp_path / "b"),
                             log=interrupt_at_step_4)
  assert not (tmp_path / "b" / "summary.json").exists()
  assert "4" in os.listdir(tmp_path / "b" / "checkpoints")
  lines_b: list[str] = []
  b = train.train_and_evaluate(train.TrainConfig(**BASE), str(tmp_path / "b"),
                               log=lines_b.append)
  assert b["resumed_from"] == 4
  assert "resumed from checkpoint at step 4" in lines_b
  # Same seeds, same batches, same trusted keys: the resumed run ends where A ended.
  assert b["test_loss"] == pytest.approx(a["test_loss"], rel=1e-5)
  assert b["test_accuracy"] == pytest.approx(a["test_accuracy"])
