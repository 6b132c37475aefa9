"""The enclave backend trains in a process whose affinity is one CPU (no callback deadlock)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_SCRIPT = """
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


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity")
def test_enclave_backend_trains_with_one_cpu():
  """Without asymml_jax.host_threads the first callback hangs (the timeout fails it)."""
  out = subprocess.run([sys.executable, "-c", textwrap.dedent(_SCRIPT)], cwd=REPO,
                       capture_output=True, text=True, timeout=300,
                       env={k: v for k, v in os.environ.items() if k != "PJRT_NPROC"})
  assert out.returncode == 0, out.stderr[-3000:]
  assert "affinity 1 losses" in out.stdout
