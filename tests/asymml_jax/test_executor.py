"""The trusted executor: ordering, idempotency, state lifetime, errors."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from asymml_jax import stages as st
from asymml_jax import verify
from asymml_jax.decomposition import DecompositionConfig
from asymml_jax.executor import ExecutorError, TrustedExecutor
from asymml_jax.models import get_model
from asymml_jax.plan import make_plan


@pytest.fixture(scope="module")
def setup():
  model = get_model("vgg11", width=0.25)
  plan = make_plan(model, 2, DecompositionConfig(rank_fraction=0.25))
  v = model.init(jax.random.key(0))
  return model, plan, v, verify.random_batch(model, 2)


def test_forward_order_idempotency_and_private_outputs(setup):
  model, plan, v, batch = setup
  ex = TrustedExecutor(model, plan, jax.random.key(1))
  ex.begin(5, batch, train=False)
  with pytest.raises(ExecutorError, match="before stage 0"):
    ex.forward(5, 1, {}, st.stage_params(model, v["params"], 1), st.stage_stats(v["batch_stats"], 1))
  p0 = st.stage_params(model, v["params"], 0)
  rs, loss, metrics, _ = ex.forward(5, 0, {}, p0, st.stage_stats(v["batch_stats"], 0))
  again = ex.forward(5, 0, {}, p0, st.stage_stats(v["batch_stats"], 0))
  assert again[0] is rs  # a repeated (step, stage) returns the cached answer
  assert loss is None and metrics is None
  # Stage 0 of a 3-channel image at r_max 1 releases a residual, never the image.
  for site, r in rs.items():
    assert plan.sites[site].split
    assert not np.allclose(np.asarray(r), batch["image"])


def test_unknown_step_and_backward_errors(setup):
  model, plan, v, batch = setup
  ex = TrustedExecutor(model, plan, jax.random.key(1))
  with pytest.raises(ExecutorError, match="unknown step 3"):
    ex.forward(3, 0, {}, {}, {})
  ex.begin(3, batch, train=True)
  with pytest.raises(ExecutorError, match="before its forward"):
    ex.backward(3, 0, {}, None)
  ex.end(3)
  assert ex.open_steps == ()


def test_begin_rejects_wrong_image_shape(setup):
  model, plan, _, batch = setup
  ex = TrustedExecutor(model, plan, jax.random.key(1))
  with pytest.raises(ValueError, match="expects images"):
    ex.begin(0, dict(batch, image=batch["image"][:, :16]), train=True)
