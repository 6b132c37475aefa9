"""Execution backends: one staged model, several ways to run it (DESIGN section 5).

=========  ========================================  =======================
backend    trusted part runs                         untrusted part runs
=========  ========================================  =======================
dense      -- (no split; everything untrusted)       accelerator
inline     traced into the same jitted program       accelerator
local      host callback into an in-process          accelerator
           :class:`~asymml_jax.executor.TrustedExecutor`
           (JAX on the CPU)
enclave    host callback over the bridge into the    accelerator
           enclave process (``enclave_bridge``)
tee_only   everything in the enclave process         --
=========  ========================================  =======================

Every backend implements :class:`Backend`: ``grads`` (loss, gradients, new
batch statistics and aggregate metrics of one training batch) and
``evaluate``.  The process backends are registered by ``enclave_bridge``
through :func:`register_backend`, so this library never imports the bridge.

The host-callback machinery (:class:`CallbackHook`) is shared by ``local`` and
``enclave``: each trusted stage is a ``jax.custom_vjp`` whose forward and
backward both call the host through ``jax.pure_callback``.  The forward
callback also returns a token that the backward callback consumes, so XLA can
neither drop a forward whose value is unused nor run a backward before it.

Data parallelism (DESIGN section 10): ``dense``, ``inline``, ``local`` and
``enclave`` take an optional ``mesh=`` (:func:`asymml_jax.parallel.make_mesh`);
with it the step is jitted with the batch split over the mesh's ``data`` axis
and everything else replicated, and each callback serves the whole batch once
with its residuals re-sharded for the accelerator (see
:mod:`asymml_jax.parallel` for why).  Without a mesh nothing changes.
"""

from __future__ import annotations

import abc
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from asymml_jax import host_threads
from asymml_jax import integrity, precision
from asymml_jax import parallel
from asymml_jax import stages as st
from asymml_jax.decomposition import DecompositionConfig
from asymml_jax.executor import TrustedExecutor, to_numpy
from asymml_jax.models.base import StagedModel
from asymml_jax.plan import Plan, make_plan
from asymml_jax.privacy.config import PrivacyConfig

Tree = Any


class Backend(abc.ABC):
  """The interface every execution backend implements."""

  name: str = "?"
  model: StagedModel
  plan: Plan

  @abc.abstractmethod
  def grads(self, params: Tree, stats: Tree, batch: Mapping[str, Any] | None,
            step: int) -> tuple[jax.Array, Tree, Tree, dict]:
    """Loss, parameter gradients, new batch statistics, metrics of one step."""

  @abc.abstractmethod
  def evaluate(self, params: Tree, stats: Tree, batch: Mapping[str, Any] | None,
               index: int) -> dict:
    """Aggregate metrics (``loss_sum``, ``correct``, ``count``) of one eval batch."""

  def site_ranks(self) -> dict[str, int]:
    """The static rank each split site is compiled with (calibrated ones once known)."""
    return plan_ranks(self.plan)

  def close(self) -> None:
    """Releases processes or buffers the backend holds."""

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def plan_ranks(plan: Plan) -> dict[str, int]:
  """``{site: r_max}`` of a plan's split sites."""
  return {site: sp.r_max for site, sp in plan.sites.items() if sp.split}


def _struct(tree):
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


batch_struct = st.batch_struct


def _sharded_group(mesh: Mesh) -> Callable[..., dict]:
  """:func:`asymml_jax.stages.untrusted_group`, data-parallel over ``mesh``.

  The residuals (whole, from the trusted side) are replicated, then split
  over ``data``; the results are split, then replicated for the trusted side
  (constraining only the input lets XLA gather it and convolve the whole batch
  on every device; the explicit replicated step turns the move from and to a
  callback's single device into a plain broadcast/gather).  In the backward
  pass the same constraints keep the gradient convolutions split, and XLA
  sums the kernel gradients over the devices.
  """
  def group(model_, plan_, k, conv_params, rs, residual_dtype_):
    rs = parallel.shard_batch(parallel.replicate(rs, mesh), mesh)
    out = st.untrusted_group(model_, plan_, k, conv_params, rs, residual_dtype_)
    return parallel.replicate(parallel.shard_batch(out, mesh), mesh)
  return group


class _WholeBatchHook(st.InlineHook):
  """The ``inline`` hook on a mesh: each trusted stage on the whole batch, unpartitioned.

  Every stage runs in a ``jax.shard_map`` whose inputs and outputs are all
  replicated, so each device computes it on the whole batch, as one enclave
  serving the host does (DESIGN section 10, :mod:`asymml_jax.parallel`), and
  XLA's SPMD partitioner never splits the TEE's computation over the batch.
  (It miscompiles the batch-grouped convolution of the per-sample kernel
  gradients in :func:`asymml_jax.privacy.gradients.trusted_gradient_shares`
  when the batch is sharded: 0.3-0.9 relative error, jax 0.10.2.)
  """

  def __init__(self, model, plan, batch, key, train, mesh: Mesh):
    super().__init__(model, plan, batch, key, train)
    self.mesh = mesh

  def __call__(self, k, yr, params_k, stats_k):
    def stage(params_k, stats_k, yr, priv, batch, key):
      return st.trusted_stage(self.model, self.plan, k, params_k, stats_k, yr, priv, batch,
                              key, self.train)
    whole = jax.shard_map(stage, mesh=self.mesh, in_specs=PartitionSpec(),
                          out_specs=PartitionSpec())
    (rs, self.priv, loss), (new_stats, metrics) = whole(
        params_k, stats_k, yr, self.priv, self.batch, self.key)
    return rs, loss, metrics, new_stats


# --------------------------------------------------------------- in-program
class InlineBackend(Backend):
  """``dense`` and ``inline``: trusted stages traced into the jitted step."""

  def __init__(self, model: StagedModel, plan: Plan, key: jax.Array, *,
               name: str = "inline", residual_dtype: Any = None,
               mesh: Mesh | None = None):
    if name == "inline" and plan.decomposition.rank_plan == "calibrate":
      raise ValueError("rank_plan='calibrate' fixes ranks from the first batch inside the "
                       "enclave: use the enclave backend (inline traces every stage before "
                       "any data is seen)")
    self.name, self.model, self.plan, self._key = name, model, plan, key
    self._residual_dtype = residual_dtype
    self.mesh = mesh
    if mesh is not None:
      if plan.verify_untrusted:  # the checks report through jax.debug.callback
        parallel.check_callback_mesh(mesh, f"the {name} backend with integrity checks")
      self._key = parallel.put_replicated(key, mesh)

    def loss(params, stats, batch, key, step, train):
      if mesh is None or name == "dense":  # dense: every layer data-parallel
        return st.inline_loss(model, plan, params, stats, batch, key, step, train,
                              residual_dtype)
      # inline on a mesh: the trusted half on the whole batch, as one enclave
      # serving the host does; the untrusted convolutions data-parallel.
      hook = _WholeBatchHook(model, plan, batch, st.step_key(key, step), train, mesh)
      return st.run_untrusted(model, plan, params, stats, hook, residual_dtype,
                              _sharded_group(mesh))

    def grad_fn(params, stats, batch, key, step):
      (l, (new_stats, metrics)), g = jax.value_and_grad(loss, has_aux=True)(
          params, stats, batch, key, step, True)
      return l, g, new_stats, metrics

    def eval_fn(params, stats, batch, key, index):
      return loss(params, stats, batch, key, index, False)[1][1]

    if mesh is None:
      self._grad = jax.jit(grad_fn)
      self._eval = jax.jit(eval_fn)
    else:  # DESIGN section 10: batch over ``data``, the rest replicated
      rep, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
      self._grad = jax.jit(grad_fn, in_shardings=(rep, rep, data, rep, rep),
                           out_shardings=rep)
      self._eval = jax.jit(eval_fn, in_shardings=(rep, rep, data, rep, rep),
                           out_shardings=rep)

  def _place(self, params, stats, batch):
    """Without a mesh: unchanged; with one: weights replicated, batch split (checked)."""
    if self.mesh is None:
      return params, stats, batch
    return (*parallel.put_replicated((params, stats), self.mesh),
            parallel.put_batch(batch, self.mesh))

  def _checked(self, fn, *args):
    """``fn(*args)``; with integrity checks on, waits and raises their typed error."""
    if not self.plan.verify_untrusted:
      return fn(*args)
    with integrity.typed_errors():
      return jax.block_until_ready(fn(*args))

  def grads(self, params, stats, batch, step):
    self.model.check_input(batch["image"])
    params, stats, batch = self._place(params, stats, batch)
    return self._checked(self._grad, params, stats, batch, self._key, jnp.int32(step))

  def evaluate(self, params, stats, batch, index):
    self.model.check_input(batch["image"])
    params, stats, batch = self._place(params, stats, batch)
    return self._checked(self._eval, params, stats, batch, self._key, jnp.int32(-1 - index))


# ------------------------------------------------------------ host callbacks
class CallbackHook:
  """Trusted-stage hook that calls the host: forward and backward callbacks.

  Args:
    model, plan: as everywhere.
    batch: abstract batch (shapes only; the data lives on the trusted side).
    tag: traced int32 step tag passed to the host.
    train: build ``custom_vjp`` stages (training) or plain callbacks (eval).
    host_forward: ``(k, tag, yr, params_k, stats_k) -> (rs, loss, metrics, new_stats)``.
    host_backward: ``(k, tag, drs, dloss) -> (dyr, dparams_k)``.

  ``params_k`` has the :func:`asymml_jax.stages.boundary_params` layout (the
  kernels of split convolutions travel one stage early, for the trusted
  side's overlap), and so has ``dparams_k``.
  """

  def __init__(self, model: StagedModel, plan: Plan, batch: Mapping, tag: jax.Array,
               train: bool, host_forward: Callable, host_backward: Callable):
    self.model, self.plan, self.batch, self.tag, self.train = model, plan, batch, tag, train
    self.host_forward, self.host_backward = host_forward, host_backward
    self._priv = st.empty_private()
    self._early: dict = {}  # shapes of the kernels the previous stage carried
    # A scalar threaded through every stage (forward and, as its cotangent,
    # backward) so that callbacks run in stage order even where no tensor
    # links two stages (e.g. a fully trusted convolution between them).
    self._link = jnp.zeros((), jnp.float32)

  def _out_struct(self, k, yr, params_k, stats_k):
    def f(yr, params_k, stats_k, priv, batch):
      return st.trusted_stage(self.model, self.plan, k, params_k, stats_k, yr, priv,
                              batch, jax.random.key(0), self.train)
    full = st.merge_boundary(_struct(params_k), self._early)
    (rs, priv_out, loss), (new_stats, metrics) = jax.eval_shape(
        f, _struct(yr), full, _struct(stats_k), self._priv, self.batch)
    self._priv, self._early = priv_out, _struct(params_k["next"])
    return rs, loss, metrics, new_stats

  def __call__(self, k, yr, params_k, stats_k):
    out_struct = self._out_struct(k, yr, params_k, stats_k)
    link = jax.ShapeDtypeStruct((), jnp.float32)
    host_forward, host_backward = self.host_forward, self.host_backward

    def fwd_host(tag, link_in, yr, params_k, stats_k):
      del link_in  # orders this call after the previous stage's forward
      out = host_forward(k, int(tag), yr, params_k, stats_k)
      return to_numpy(out), np.float32(0.0)

    def call_forward(yr, params_k, stats_k, tag, link_in):
      return jax.pure_callback(fwd_host, (out_struct, link), tag, link_in, yr,
                               params_k, stats_k, vmap_method="sequential")

    if not self.train:
      out, self._link = call_forward(yr, params_k, stats_k, self.tag, self._link)
      return out

    in_struct = (_struct(yr), _struct(params_k), link)

    def bwd_host(tag, link_out, dlink_out, drs, dloss):
      del link_out, dlink_out  # order this call after the forward and stage k+1's backward
      dyr, dparams = host_backward(k, int(tag), drs, dloss)
      return to_numpy(dyr), to_numpy(dparams), np.float32(0.0)

    @jax.custom_vjp
    def stage(yr, params_k, stats_k, tag, link_in):
      return call_forward(yr, params_k, stats_k, tag, link_in)

    def stage_fwd(yr, params_k, stats_k, tag, link_in):
      out, link_out = call_forward(yr, params_k, stats_k, tag, link_in)
      return (out, link_out), (link_out, tag)

    def stage_bwd(res, ct):
      link_out, tag = res
      (drs, dloss, _, _), dlink_out = ct
      if dloss is None:
        dloss = jnp.zeros((), precision.float_dtype())
      dyr, dparams, dlink_in = jax.pure_callback(
          bwd_host, in_struct, tag, link_out, dlink_out, drs, dloss,
          vmap_method="sequential")
      return dyr, dparams, None, None, dlink_in

    stage.defvjp(stage_fwd, stage_bwd)
    out, self._link = stage(yr, params_k, stats_k, self.tag, self._link)
    return out


class HostBackend(Backend):
  """Untrusted program with trusted stages behind host callbacks.

  Subclasses provide where the trusted side runs: :meth:`_begin` hands a batch
  (or a step's sampling request) to it, :meth:`_host_forward` and
  :meth:`_host_backward` serve the callbacks.
  """

  def __init__(self, model: StagedModel, plan: Plan, *, name: str,
               residual_dtype: Any = None, mesh: Mesh | None = None):
    parallel.check_callback_mesh(mesh, f"the {name} backend")
    host_threads.check_callback_threads(name)
    self.name, self.model, self.plan = name, model, plan
    self._residual_dtype = residual_dtype
    self.mesh = mesh
    self._fault: BaseException | None = None
    self.wall_seconds = 0.0  # total time in grads/evaluate (for time breakdowns)

    def guard(fn):
      def call(*args):
        try:
          return fn(*args)
        except BaseException as e:
          self._fault = e  # re-raised, typed, outside the jitted program
          raise
      return call
    host_forward = guard(lambda *a: self._host_forward(*a))
    host_backward = guard(lambda *a: self._host_backward(*a))
    # With a mesh, each callback serves the whole batch once (bulk semantics)
    # and its residuals are re-sharded over ``data`` before the untrusted
    # convolutions (asymml_jax.parallel, DESIGN section 10).
    group = None if mesh is None else _sharded_group(mesh)

    def grad_fn(params, stats, tag, batch_size):
      hook = CallbackHook(model, plan, batch_struct(model, batch_size), tag, True,
                          host_forward, host_backward)
      (l, (new_stats, metrics)), g = jax.value_and_grad(
          lambda p: st.run_untrusted(model, plan, p, stats, hook, residual_dtype, group,
                                     boundary=True),
          has_aux=True)(params)
      return l, g, new_stats, metrics

    def eval_fn(params, stats, tag, batch_size):
      hook = CallbackHook(model, plan, batch_struct(model, batch_size), tag, False,
                          host_forward, host_backward)
      return st.run_untrusted(model, plan, params, stats, hook, residual_dtype,
                              group, boundary=True)[1][1]

    if mesh is None:
      self._grad = jax.jit(grad_fn, static_argnames="batch_size")
      self._eval = jax.jit(eval_fn, static_argnames="batch_size")
    else:  # inputs are placed replicated by grads/evaluate (jit refuses
      # in_shardings together with the keyword batch_size)
      rep = parallel.replicated(mesh)
      self._grad = jax.jit(grad_fn, static_argnames="batch_size", out_shardings=rep)
      self._eval = jax.jit(eval_fn, static_argnames="batch_size", out_shardings=rep)

  @abc.abstractmethod
  def _begin(self, tag: int, batch: Mapping[str, Any] | None, train: bool) -> int:
    """Prepares step ``tag`` on the trusted side; returns its batch size."""

  @abc.abstractmethod
  def _host_forward(self, k, tag, yr, params_k, stats_k):
    ...

  @abc.abstractmethod
  def _host_backward(self, k, tag, drs, dloss):
    ...

  def _end(self, tag: int) -> None:
    """Drops step ``tag``'s trusted state (stages without gradients never see a backward)."""

  def _run(self, fn, tag: int, *args, **kwargs):
    self._fault = None
    try:
      return jax.block_until_ready(fn(*args, **kwargs))
    except Exception as e:
      fault, self._fault = self._fault, None
      if fault is not None and fault is not e:
        raise fault from None  # the typed error a trusted-side callback raised
      raise
    finally:
      self._end(tag)

  def _batch_size(self, tag: int, batch, train: bool) -> int:
    """:meth:`_begin`, with the batch checked to split evenly over the mesh."""
    if self.mesh is not None and batch is not None:  # refused before the trusted side sees it
      parallel.check_batch_size(int(np.shape(batch["image"])[0]), self.mesh)
    n = self._begin(tag, batch, train)
    try:
      parallel.check_batch_size(n, self.mesh)
    except ValueError:
      self._end(tag)
      raise
    return n

  def grads(self, params, stats, batch, step):
    t0 = time.perf_counter()
    try:
      params, stats, tag = parallel.put_replicated((params, stats, jnp.int32(step)),
                                                   self.mesh)
      n = self._batch_size(int(step), batch, True)
      return self._run(self._grad, int(step), params, stats, tag, batch_size=n)
    finally:
      self.wall_seconds += time.perf_counter() - t0

  def evaluate(self, params, stats, batch, index):
    t0 = time.perf_counter()
    tag = -1 - int(index)
    try:
      params, stats, tag_array = parallel.put_replicated((params, stats, jnp.int32(tag)),
                                                         self.mesh)
      n = self._batch_size(tag, batch, False)
      return self._run(self._eval, tag, params, stats, tag_array, batch_size=n)
    finally:
      self.wall_seconds += time.perf_counter() - t0


class LocalBackend(HostBackend):
  """``local``: host callbacks into an in-process :class:`TrustedExecutor`."""

  def __init__(self, model: StagedModel, plan: Plan, key: jax.Array, *,
               residual_dtype: Any = None, mesh: Mesh | None = None):
    if plan.decomposition.rank_plan == "calibrate":
      raise ValueError("rank_plan='calibrate' is served by the enclave backend: the local "
                       "backend's trusted stages run inside host callbacks, where "
                       "compiling and running a calibration pass can deadlock XLA's CPU "
                       "thread pool")
    # The boundary layout of the process backends; Y_L is computed on demand
    # (nothing runs between two callbacks here to overlap it with).
    self.executor = TrustedExecutor(model, plan, key, overlap=True)
    super().__init__(model, plan, name="local", residual_dtype=residual_dtype, mesh=mesh)

  def _begin(self, tag, batch, train):
    if batch is None:
      raise ValueError("the local backend needs the batch (it has no data of its own)")
    self.executor.end(tag)
    self.executor.begin(tag, batch, train=train)
    return int(np.shape(batch["image"])[0])

  def _end(self, tag):
    self.executor.end(tag)

  def _host_forward(self, k, tag, yr, params_k, stats_k):
    return self.executor.forward(tag, k, yr, params_k, stats_k)

  def _host_backward(self, k, tag, drs, dloss):
    return self.executor.backward(tag, k, drs, dloss)


# ------------------------------------------------------------------ registry
BackendFactory = Callable[..., Backend]
_REGISTRY: dict[str, BackendFactory] = {}
_DATA_INFO: dict[str, Callable[[Mapping[str, Any]], dict]] = {}
PROCESS_BACKENDS = ("enclave", "tee_only")


def register_backend(name: str, factory: BackendFactory,
                     data_info: Callable[[Mapping[str, Any]], dict] | None = None) -> None:
  """Registers ``factory(model, plan, key, **options) -> Backend`` under ``name``.

  ``data_info(options)``, for backends whose trusted side holds the data set,
  returns its public description (``name``, ``image_shape``, ``num_classes``,
  ``num_train``, ``num_test``) so the untrusted side never loads samples.
  """
  _REGISTRY[name] = factory
  if data_info is not None:
    _DATA_INFO[name] = data_info


def backend_data_info(name: str, options: Mapping[str, Any]) -> dict | None:
  """The public data description of a backend that owns its data, else ``None``."""
  fn = _DATA_INFO.get(name)
  return None if fn is None else fn(options)


def available_backends() -> tuple[str, ...]:
  return tuple(sorted(_REGISTRY))


UNTRUSTED_DEVICES = ("cpu", "gpu", "tpu")


def untrusted_device(kind: str) -> jax.Device:
  """The first local JAX device of platform ``kind`` for the untrusted program.

  The trusted half always runs on the CPU (in the enclave process or, for the
  in-process backends, wherever its own jitted functions are placed).

  Raises:
    ValueError: for an unknown kind, or when no such device is present (the
      message lists the platforms that are).
  """
  if kind not in UNTRUSTED_DEVICES:
    raise ValueError(f"untrusted device must be one of {', '.join(UNTRUSTED_DEVICES)}, "
                     f"got {kind!r}")
  try:
    devices = jax.local_devices(backend=kind)  # this host's (under jax.distributed too)
  except RuntimeError:
    devices = []
  if not devices:
    present = sorted({d.platform for d in jax.devices()})
    raise ValueError(f"no {kind} device is available to JAX here (present: "
                     f"{', '.join(present)}); install the matching jax plugin or choose "
                     "--untrusted_device=cpu")
  return devices[0]


def make_plan_for(name: str, model: StagedModel, batch_size: int,
                  decomposition: DecompositionConfig, force: str | None = None, *,
                  privacy: PrivacyConfig = PrivacyConfig(),
                  expected_batch_size: float | None = None) -> Plan:
  """The plan a backend runs: ``dense`` forces everything untrusted, ``tee_only`` trusted."""
  if name == "dense":
    force = "dense"
  elif name == "tee_only":
    force = "trusted"
  return make_plan(model, batch_size, decomposition, force=force, privacy=privacy,
                   expected_batch_size=expected_batch_size)


def make_backend(name: str, model: StagedModel, *, key: jax.Array, batch_size: int,
                 decomposition: DecompositionConfig = DecompositionConfig(),
                 force: str | None = None, privacy: PrivacyConfig = PrivacyConfig(),
                 expected_batch_size: float | None = None, **options) -> Backend:
  """Builds backend ``name`` for ``model``; unknown names list the choices.

  ``privacy`` must have its noise multiplier fixed (not a target epsilon):
  calibration needs the run length, which :mod:`asymml_jax.train` knows.

  Common ``options``: ``residual_dtype`` (e.g. ``jnp.bfloat16``: the dtype of
  the untrusted residual path; the trusted half stays float32) and ``mesh``
  (a :func:`asymml_jax.parallel.make_mesh` mesh for data parallelism,
  DESIGN section 10; ``tee_only`` refuses one of several devices).
  """
  if privacy.enabled and privacy.target_epsilon is not None:
    raise ValueError("make_backend needs a fixed noise_multiplier: calibrate the "
                     "target epsilon first (asymml_jax.privacy.accounting)")
  if name not in _REGISTRY:
    hint = ""
    if name in PROCESS_BACKENDS:
      hint = f" ({name!r} is provided by the enclave bridge: import enclave_bridge first)"
    raise ValueError(f"unknown backend {name!r}; choices: "
                     f"{', '.join(available_backends())}{hint}")
  plan = make_plan_for(name, model, batch_size, decomposition, force, privacy=privacy,
                       expected_batch_size=expected_batch_size)
  return _REGISTRY[name](model, plan, key, **options)


register_backend("dense", lambda model, plan, key, **o: InlineBackend(
    model, plan, key, name="dense", **o))
register_backend("inline", lambda model, plan, key, **o: InlineBackend(
    model, plan, key, name="inline", **o))
register_backend("local", lambda model, plan, key, **o: LocalBackend(model, plan, key, **o))
