"""Training loop: config validation, summary, checkpoint/resume after Ctrl-C."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
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


@pytest.mark.slow  # ~55 s; test_integration's crash-then-resume covers it in the default run
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


# ----------------------------------------------------------------------- DP
from asymml_jax.privacy import accounting  # noqa: E402
from asymml_jax.privacy.config import PrivacyConfig  # noqa: E402

DP = dict(enabled=True, clip=0.05, grad_clip=1e-4, target_epsilon=4.0, delta=1e-5)


@pytest.mark.parametrize("change, words", [
    (dict(norm="batch"), ["BatchNorm mixes samples"]),
    (dict(decomposition=DecompositionConfig(rank_fraction=0.25, scope="per_batch")),
     ["per_batch", "depend on the other samples"]),
    (dict(privacy={**DP, "delta": 1.0 / 4000}), ["delta must be < 1/N"]),
    (dict(privacy={**DP, "clip": 0.0}), ["clip must be > 0 when enabled"]),
    (dict(privacy={**DP, "clip": -1.0}), ["clip must be > 0 when enabled"]),
    (dict(backend="dense"), ["dense backend runs everything on the untrusted device"]),
])
def test_dp_config_refusals_write_nothing(tmp_path, change, words):
  cfg = {**BASE, "norm": "group", "privacy": DP, **change}
  with pytest.raises(ValueError) as err:
    train.train_and_evaluate(cfg, str(tmp_path / "w"))
  for w in words:
    assert w in str(err.value)
  assert not (tmp_path / "w").exists()


def test_dp_run_reports_epsilon_and_uses_poisson_batches(tmp_path):
  lines: list[str] = []
  cfg = {**BASE, "norm": "group", "max_steps": 3, "log_every": 3, "privacy": DP}
  s = train.train_and_evaluate(cfg, str(tmp_path / "dp"), log=lines.append)
  p = s["privacy"]
  on_disk = json.loads((tmp_path / "dp" / "summary.json").read_text())
  assert on_disk["privacy"] == p and on_disk["epsilon"] == s["epsilon"]
  for key in ("delta", "noise_multiplier", "clip", "grad_clip", "sampling_rate", "steps",
              "releases_per_step"):
    assert key in p
  assert p["sampling"] == "poisson" and p["sampling_rate"] == pytest.approx(32 / 4500)
  assert p["steps"] == 3 and p["target_epsilon"] == 4.0
  # Calibrated up front for the run's length, and recomputable by anyone.
  assert s["epsilon"] == pytest.approx(4.0, abs=1e-4)
  assert s["epsilon"] == pytest.approx(accounting.epsilon(
      noise_multiplier=p["noise_multiplier"], sampling_rate=p["sampling_rate"], steps=3,
      releases_per_step=p["releases_per_step"], delta=1e-5), abs=1e-9)
  # L = one release per split site + one output-gradient release per split conv.
  splits = [x for x in s["plan"]["sites"] if x["mode"] in ("per_sample", "per_batch")]
  assert p["releases_per_step"] == len(splits) + sum(len(x["consumers"]) for x in splits)
  assert s["plan"]["batch_size"] > 32  # padded Poisson batch
  assert any("epsilon" in l and l.startswith("step 3/3") for l in lines)


def test_privacy_off_reports_infinite_epsilon():
  cfg = train.TrainConfig(**BASE)
  assert cfg.privacy == PrivacyConfig() and cfg.privacy.batch_sampling == "shuffle"


# ------------------------------------------------------------ scale (section 10)
@pytest.mark.parametrize("change, match", [
    (dict(residual_dtype="float16"), "residual_dtype must be one of"),
    (dict(untrusted_device="fpga"), "untrusted_device must be one of"),
    (dict(num_devices=0), "num_devices must be an integer >= 1"),
    (dict(num_devices=3), "batch_size 32 must be a multiple of num_devices 3"),
    (dict(num_devices=2, eval_batch_size=251), "eval_batch_size 251 must be a multiple of "
                                               "num_devices 2"),
    (dict(backend="tee_only", num_devices=2), "no accelerator work to split"),
    (dict(backend="tee_only", residual_dtype="bfloat16"), "releases no residuals"),
])
def test_scale_config_refusals(change, match):
  with pytest.raises(ValueError, match=match):
    train.TrainConfig(**{**BASE, **change})


@pytest.mark.parametrize("change, words", [
    (dict(num_devices=2, eval_batch_size=250), ["2 devices were asked for", "XLA_FLAGS"]),
    (dict(untrusted_device="tpu"), ["no tpu device is available"]),
])
def test_absent_devices_are_refused_before_anything_is_written(tmp_path, change, words):
  if "num_devices" in change and change["num_devices"] <= len(jax.local_devices()):
    pytest.skip("this host has enough devices")
  if change.get("untrusted_device") in {d.platform for d in jax.devices()}:
    pytest.skip("this host has that device")
  with pytest.raises(ValueError) as err:
    train.train_and_evaluate({**BASE, **change}, str(tmp_path / "w"))
  for w in words:
    assert w in str(err.value)
  assert not (tmp_path / "w").exists()


def test_scale_options_default_changes_nothing_and_bfloat16_reaches_the_backend():
  assert train._scale_options(train.TrainConfig(**BASE), 32) == {}
  opts = train._scale_options(train.TrainConfig(**{**BASE, "residual_dtype": "bfloat16"}), 32)
  assert opts == {"residual_dtype": jnp.bfloat16}
  # An explicit platform pins the program to a one-device mesh of it.
  cpu = train._scale_options(train.TrainConfig(**{**BASE, "untrusted_device": "cpu"}), 32)
  assert cpu["mesh"].devices.size == 1 and cpu["mesh"].devices.flat[0].platform == "cpu"


def test_mnist_config_carries_the_scale_fields():
  from experiments.configs import mnist
  c = mnist.get_config()
  assert (c.num_devices, c.untrusted_device, c.residual_dtype) == (1, "", "float32")
  c.residual_dtype = "bfloat16"
  c.num_devices = 2
  cfg = train.TrainConfig.from_config(c)
  assert cfg.residual_dtype == "bfloat16" and cfg.num_devices == 2
