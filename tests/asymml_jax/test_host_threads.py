"""Host callbacks on a one-CPU process: the pool setting, and real local and enclave runs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from asymml_jax import host_threads as ht

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_one_cpu_gets_two_pool_threads_before_the_client_starts():
  env = {}
  assert ht.ensure_callback_threads(env, cpus=1, started=lambda: False)
  assert env == {ht.ENV: str(ht.MIN_CALLBACK_THREADS)}
  assert ht.pool_threads(env, cpus=1) == ht.MIN_CALLBACK_THREADS


@pytest.mark.parametrize("env,cpus", [({}, 2), ({}, 16), ({ht.ENV: "3"}, 1)])
def test_enough_threads_are_left_alone(env, cpus):
  before = dict(env)
  assert ht.ensure_callback_threads(env, cpus=cpus, started=lambda: True)
  assert env == before


def test_a_client_started_too_small_is_reported(monkeypatch):
  monkeypatch.setattr(ht, "_started_too_small", False)
  env = {ht.ENV: "nonsense"}
  assert not ht.ensure_callback_threads(env, cpus=1, started=lambda: True)
  assert env[ht.ENV] == "nonsense"  # not changed behind the user's back
  with pytest.raises(RuntimeError, match=r"PJRT_NPROC=2.*import asymml_jax before"):
    ht.check_callback_threads("local")


_ONE_CPU_LOCAL = """
import os, sys
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
import jax
from asymml_jax import backends as bk
from asymml_jax import verify
from tests.helpers.tiny_model import tiny_staged_model
model = tiny_staged_model(input_shape=(16, 16, 3), channels=(8, 8), norm="group")
v = model.init(jax.random.key(0))
be = bk.make_backend("local", model, key=jax.random.key(1), batch_size=4)
for step in range(2):
  loss = be.grads(v["params"], v["batch_stats"], verify.random_batch(model, 4, seed=step), step)[0]
print("affinity", len(os.sched_getaffinity(0)), "PJRT_NPROC", os.environ.get("PJRT_NPROC"),
      "loss", float(loss))
"""


_ONE_CPU_ENCLAVE = """
import os, sys, tempfile
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
import jax, numpy as np
import enclave_bridge  # registers the process backends
from asymml_jax import backends as bk
from asymml_jax.models import get_model
from tests.helpers import enclave as he
d = tempfile.mkdtemp()
sealed, key = he.seal_to(he.random_dataset(n_train=16, n_test=8), d)
model = get_model("vgg11", width=0.125)
v = jax.device_get(model.init(jax.random.key(0)))
be = bk.make_backend("enclave", model, key=jax.random.key(1), batch_size=4, sealed_path=sealed,
                     key_path=key, workdir=d, eval_batch_size=4)
try:
  losses = [float(be.grads(v["params"], v["batch_stats"], None, s)[0]) for s in range(2)]
finally:
  be.close()
assert all(np.isfinite(losses)), losses
print("affinity", len(os.sched_getaffinity(0)), "losses", losses)
"""


def _run_with_one_cpu(script: str, expect: str) -> None:
  """Runs ``script`` in a fresh interpreter with ``PJRT_NPROC`` unset; a hang fails by timeout."""
  out = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=REPO,
                       capture_output=True, text=True, timeout=300,
                       env={k: v for k, v in os.environ.items() if k != ht.ENV})
  assert out.returncode == 0, out.stderr[-3000:]
  assert expect in out.stdout


one_cpu = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity")


@one_cpu
def test_local_backend_trains_with_one_cpu():
  """Without the pool setting this hangs in the first callback."""
  _run_with_one_cpu(_ONE_CPU_LOCAL, "affinity 1 PJRT_NPROC 2 loss")


@one_cpu
def test_enclave_backend_trains_with_one_cpu():
  """The enclave client's callbacks read ``jax.Array`` arguments: the same hang without it."""
  _run_with_one_cpu(_ONE_CPU_ENCLAVE, "affinity 1 losses")
