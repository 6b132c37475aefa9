"""The experiment scripts as a user runs them: outputs and clear errors."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, text=True,
                        capture_output=True, timeout=timeout)


def test_verify_float64_on_the_users_npz_writes_json(tmp_path):
  from asymml_jax import sample_images
  npz, out = tmp_path / "photos.npz", tmp_path / "v.json"
  np.savez(npz, image=sample_images.photo_batch(3, 32), label=np.array([2, 0, 1]))
  p = _run("experiments.verify", "--model=vgg11", "--width=0.125", "--backends=dense,inline",
           "--dtype=float64", f"--npz={npz}", "--batch_size=2", f"--json={out}")
  assert p.returncode == 0, p.stderr
  result = json.loads(out.read_text())
  assert result["model"] == "vgg11" and result["dtype"] == "float64"
  assert result["batch_size"] == 2 and result["passed"] and "float32_floor" not in result
  assert [b["name"] for b in result["backends"]] == ["dense", "inline"]
  assert result["max_rel_err_loss"] <= 1e-10 and result["max_rel_err_grads"] <= 1e-10
  assert "max_rel_err_grads" in p.stdout


def test_verify_bad_model_and_backend_names_list_choices(tmp_path):
  p = _run("experiments.verify", "--model=alexnet", f"--json={tmp_path / 'x.json'}")
  assert p.returncode != 0
  assert "choices: resnet18, resnet20, vgg11, vgg16" in p.stderr
  assert "Traceback" not in p.stderr
  p = _run("experiments.verify", "--model=vgg11", "--width=0.25", "--backends=inline,warp")
  assert p.returncode != 0 and "unknown backend 'warp'" in p.stderr
  assert "Traceback" not in p.stderr
  assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("flags, words", [
    (["--npz=/nonexistent/b.npz"], "does not exist"),
    (["--npz=a.npz", "--images=dir"], "--images or --npz, not both"),
    (["--dtype=float64", "--verify_untrusted"], "leave it off with --dtype=float64"),
    (["--dtype=float16"], "one of <float32|float64>"),
])
def test_verify_bad_data_and_dtype_flags_are_clear_errors(tmp_path, flags, words):
  p = _run("experiments.verify", "--model=vgg11", "--width=0.125", "--backends=inline",
           f"--json={tmp_path / 'x.json'}", *flags)
  assert p.returncode != 0 and words in p.stderr, p.stderr
  assert "Traceback" not in p.stderr
  assert not (tmp_path / "x.json").exists()


def test_train_bad_config_value_is_a_clear_error(tmp_path):
  workdir = tmp_path / "w"
  p = _run("experiments.train", "--config=experiments/configs/mnist.py",
           f"--workdir={workdir}", "--config.batch_size=0")
  assert p.returncode != 0
  assert "batch_size must be in [1, 65536], got 0" in p.stderr
  assert "Traceback" not in p.stderr
  assert not workdir.exists()


def test_train_missing_cifar_dir_is_a_clear_error(tmp_path):
  p = _run("experiments.train", "--config=experiments/configs/mnist.py",
           f"--workdir={tmp_path / 'w'}", "--config.dataset=cifar10",
           f"--config.data_dir={tmp_path / 'nope'}")
  assert p.returncode != 0
  assert "nope" in p.stderr and "Traceback" not in p.stderr
