"""Data parallelism over a mesh of one host's devices (DESIGN section 10).

The mesh tests need several devices, which XLA only makes when
``XLA_FLAGS=--xla_force_host_platform_device_count`` is set before JAX starts:
they run one subprocess with 5 CPU devices (a mesh of 4, one left free for the
host callbacks, see :mod:`asymml_jax.parallel`).  The rest are fast unit tests
of the mesh helpers' errors in this process (one CPU device).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from asymml_jax import parallel

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOL = 1e-4

# Runs in a fresh interpreter with 5 CPU devices; prints one JSON line.
_MESH_SCRIPT = r'''
import json, re, sys, tempfile
import jax, jax.numpy as jnp
from asymml_jax import backends as bk, parallel, verify
from asymml_jax.decomposition import DecompositionConfig
from asymml_jax.models import get_model
import enclave_bridge

out = {"devices": len(jax.devices())}
model = get_model("vgg11", input_shape=(32, 32, 3), width=0.125)
mesh = parallel.make_mesh(4)
made = {}
real_make = bk.make_backend
def recording_make(name, *a, **k):
  be = real_make(name, *a, **k)
  if k.get("mesh") is not None:
    made[name] = be
  return be
bk.make_backend = recording_make
dec = DecompositionConfig(rank_fraction=0.25, tau=0.1)
with tempfile.TemporaryDirectory() as tmp:
  r = verify.compare(model, ["inline", "enclave"], batch_size=8, decomposition=dec, floor=False,
                     prepare=enclave_bridge.verification_options(tmp, model.num_classes),
                     mesh=mesh)
out["rows"] = r["backends"]
out["num_devices"] = r["num_devices"]
plan = made["inline"].plan
out["split_convs"] = sum(plan.sites[c.site].mode != "trusted" for g in model.groups for c in g)

# What XLA compiled for each mesh backend's training step (cached: no recompilation).
v = model.init(jax.random.key(0))
params, stats = parallel.put_replicated((v["params"], v["batch_stats"]), mesh)
batch = parallel.put_batch(verify.random_batch(model, 8), mesh)
hlo = {
    "inline": made["inline"]._grad.lower(params, stats, batch, made["inline"]._key,
                                        jnp.int32(0)),
    "enclave": made["enclave"]._grad.lower(params, stats, jnp.int32(0), batch_size=8),
}
shape = re.compile(r"= f32\[(\d+),\d+,\d+,\d+\]\{[0-9,]*\} convolution\(")
out["hlo"] = {}
for name, lowered in hlo.items():
  text = lowered.compile().as_text()
  rows = [int(m.group(1)) for m in shape.finditer(text)]
  out["hlo"][name] = {"conv_rows": rows, "all_reduce": "all-reduce(" in text}

# Refusals, before anything compiles.
errors = {}
for label, fn in {
    "local_all_devices": lambda: bk.make_backend("local", model, key=jax.random.key(1),
                                                 batch_size=8,
                                                 mesh=parallel.make_mesh(5)),
    "indivisible_batch": lambda: made["inline"].grads(v["params"], v["batch_stats"],
                                                      verify.random_batch(model, 6), 0),
    "too_many": lambda: parallel.make_mesh(6),
}.items():
  try:
    fn()
    errors[label] = None
  except ValueError as e:
    errors[label] = str(e)
out["errors"] = errors
print("RESULT " + json.dumps(out))
'''


@pytest.fixture(scope="module")
def mesh_run():
  env = dict(os.environ)
  # 5 CPU devices; cheaper LLVM passes cut compile time by about a third
  # (what is compiled, and so the sharding checked, is the same program).
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=5"
                      " --xla_backend_optimization_level=0"
                      " --xla_llvm_disable_expensive_passes=true").strip()
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, "-c", _MESH_SCRIPT], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-6000:]
  return json.loads(lines[-1][len("RESULT "):])


def test_mesh_backends_match_single_device_dense(mesh_run):
  assert mesh_run["devices"] == 5 and mesh_run["num_devices"] == 4
  rows = {r["name"]: r for r in mesh_run["rows"]}
  assert set(rows) == {"inline", "enclave"}
  for name, r in rows.items():
    assert r["rel_err_loss"] <= TOL, r
    assert r["rel_err_grads"] <= TOL, r
    assert r["grad_devices"] == 4, r  # the gradients came back on the whole mesh
    assert {"per_sample", "per_batch"} & set(r["modes"]), r  # a split really happened


def test_untrusted_convolutions_run_on_batch_shards(mesh_run):
  """8 rows over 4 devices: the accelerator's convolutions see 2 rows each."""
  n = mesh_run["split_convs"]
  assert n >= 3
  for name, h in mesh_run["hlo"].items():
    rows = h["conv_rows"]
    # The forward Y_R = conv(R, W) of every split conv and the backward dR of
    # all but the first (the input needs no gradient) run per shard...
    assert rows.count(2) >= 2 * n - 1, (name, n, rows)
    # ...and XLA sums their kernel gradients over the devices.
    assert h["all_reduce"], name


def test_mesh_refusals(mesh_run):
  e = mesh_run["errors"]
  assert "Leave one CPU device out of the mesh" in e["local_all_devices"]
  assert "cannot be split evenly over 4 devices" in e["indivisible_batch"]
  assert "6 devices were asked for but this host has 5 cpu devices" in e["too_many"]


# ------------------------------------------------------------- unit tests
def test_make_mesh_one_device():
  mesh = parallel.make_mesh(1)
  assert mesh.axis_names == (parallel.DATA_AXIS,) and mesh.devices.size == 1
  assert parallel.num_devices(mesh) == 1 and parallel.num_devices(None) == 1
  assert parallel.batch_sharding(mesh).spec == jax.sharding.PartitionSpec("data")
  assert parallel.replicated(mesh).spec == jax.sharding.PartitionSpec()


def test_make_mesh_more_devices_than_present_names_the_cpu_flag():
  n = len(jax.local_devices()) + 1
  with pytest.raises(ValueError) as err:
    parallel.make_mesh(n)
  msg = str(err.value)
  assert f"{n} devices were asked for" in msg
  if jax.local_devices()[0].platform == "cpu":
    assert f"XLA_FLAGS=--xla_force_host_platform_device_count={n}" in msg


@pytest.mark.parametrize("devices, match", [
    (0, "must be >= 1"),
    (-2, "must be >= 1"),
    (True, "must be an integer"),
    ([], "at least one device"),
])
def test_make_mesh_bad_counts(devices, match):
  with pytest.raises(ValueError, match=match):
    parallel.make_mesh(devices)


def test_make_mesh_repeated_device():
  d = jax.local_devices()[0]
  with pytest.raises(ValueError, match="appears twice"):
    parallel.make_mesh([d, d])


def test_make_mesh_absent_platform():
  absent = next(p for p in ("tpu", "gpu") if p not in {d.platform for d in jax.devices()})
  with pytest.raises(ValueError, match=f"no {absent} device is available"):
    parallel.make_mesh(1, platform=absent)
  with pytest.raises(ValueError, match="untrusted device must be one of"):
    parallel.make_mesh(1, platform="fpga")


def test_check_batch_size():
  four = types.SimpleNamespace(devices=np.zeros(4))  # only .devices.size is read
  parallel.check_batch_size(8, four)
  parallel.check_batch_size(7, None)
  with pytest.raises(ValueError, match="a batch of 6 rows cannot be split evenly over 4 "
                                       "devices: choose a batch size that is a multiple of 4"):
    parallel.check_batch_size(6, four)


def test_no_mesh_is_a_no_op():
  tree = {"a": np.ones((3, 2))}
  assert parallel.shard_batch(tree, None) is tree
  assert parallel.replicate(tree, None) is tree
  assert parallel.put_batch(tree, None) is tree
  assert parallel.put_replicated(tree, None) is tree
  parallel.check_callback_mesh(None, "the local backend")
  parallel.check_callback_mesh(parallel.make_mesh(1), "the local backend")


def test_reserve_spare_cpu_device(monkeypatch):
  from jax._src import xla_bridge
  monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)
  env = {"XLA_FLAGS": "--foo=1 --xla_force_host_platform_device_count=4"}
  note = parallel.reserve_spare_cpu_device(4, env)
  assert env["XLA_FLAGS"] == "--foo=1 --xla_force_host_platform_device_count=5"
  assert "forcing 5 host CPU devices for a mesh of 4" in note
  for n, flags in [(4, "--xla_force_host_platform_device_count=8"), (1, "--xla_force_"
                   "host_platform_device_count=1"), (4, "")]:
    env = {"XLA_FLAGS": flags}
    assert parallel.reserve_spare_cpu_device(n, env) is None
    assert env == {"XLA_FLAGS": flags}
  # Too late once JAX has started: nothing changes.
  monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: True)
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  assert parallel.reserve_spare_cpu_device(4, env) is None


def test_tee_only_refuses_a_mesh_before_starting_an_enclave():
  from asymml_jax import backends as bk
  from asymml_jax.models import get_model
  from enclave_bridge.client import TeeOnlyBackend
  model = get_model("vgg11", input_shape=(32, 32, 3), width=0.125)
  plan = bk.make_plan_for("tee_only", model, 4, bk.DecompositionConfig())
  with pytest.raises(ValueError, match="no accelerator work to split over a mesh of 2"):
    TeeOnlyBackend(model, plan, jax.random.key(0), mesh=types.SimpleNamespace(
        devices=np.zeros(2)))
  with pytest.raises(ValueError, match="residual_dtype does not apply"):
    TeeOnlyBackend(model, plan, jax.random.key(0), residual_dtype=np.float16)
