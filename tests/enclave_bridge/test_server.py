"""Tests of enclave_bridge.server: an in-process EnclaveServer under fuzzing and typed rejections.

``EnclaveServer.handle`` must never raise or hang: every frame gets a decodable
``REPLY`` or an ``ERROR`` whose ``code`` is one of ``protocol.ERRORS``; a frame
rejected before its handler runs (undecodable, not a request, wrong sequence
number) does not advance ``next_seq`` (DESIGN section 6).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import struct
import time

import jax
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asymml_jax import stages as stg
from asymml_jax.data import Dataset
from asymml_jax.decomposition import DecompositionConfig
from enclave_bridge import ledger as lg
from enclave_bridge import protocol as pr
from enclave_bridge.server import EnclaveServer, trusted_seed
from enclave_bridge.transport import ALIGN, Arena

Op = pr.Op
KEY = b"k" * 32
TRAIN_TAG, EVAL_TAG = 100, -1   # the post-HELLO fuzz's steps
BF16 = np.dtype(ml_dtypes.bfloat16)
CASE_SECONDS = 30.0             # "never hangs": a generous bound per frame
FUZZ_SETTINGS = dict(deadline=None, database=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                            HealthCheck.filter_too_much])


def _dataset() -> Dataset:
  rng = np.random.default_rng(0)
  return Dataset(name="tiny",
                 train_images=rng.standard_normal((8, 32, 32, 1)).astype(np.float32),
                 train_labels=rng.integers(0, 10, (8,)).astype(np.int32),
                 test_images=rng.standard_normal((4, 32, 32, 1)).astype(np.float32),
                 test_labels=rng.integers(0, 10, (4,)).astype(np.int32), num_classes=10)


def _hello_meta(shared: Arena, /, **overrides) -> dict:
  """The client's HELLO config (``client._hello_config``) for the test model."""
  meta = {"backend": "enclave", "model": "vgg11", "width": 0.125, "norm": "batch",
          "decomposition": dataclasses.asdict(DecompositionConfig()), "batch_size": 4,
          "eval_batch_size": 4, "seed": 0, "arena": shared.name, "region": shared.region}
  meta.update(overrides)
  return meta


def _frame(server, op, *, seq=None, tag=0, stage=0, meta=None, tensors=()) -> bytes:
  seq = server.next_seq if seq is None else seq
  return pr.encode(pr.Message(op, seq, tag, stage, dict(meta or {}), tuple(tensors)))


def _send(server, op, **kw) -> pr.Message:
  reply = pr.decode(server.handle(_frame(server, op, **kw)))
  assert reply.op in (Op.REPLY, Op.ERROR)
  return reply


def _items(parts) -> list:
  return [(name, cls, np.asarray(leaf)) for prefix, cls, tree in parts
          for name, leaf in pr.flatten(tree, prefix).items()]


def _call(server, arena, op, *, parts=(), **kw) -> pr.Message:
  """Writes ``(prefix, class, tree)`` parts like the client, sends one frame."""
  return _send(server, op, tensors=arena.write("request", _items(parts)), **kw)


def _ok(reply: pr.Message) -> pr.Message:
  assert reply.op == Op.REPLY, reply.meta
  return reply


def _code(reply: pr.Message) -> str:
  assert reply.op == Op.ERROR, reply.meta
  return reply.meta["code"]


# ----------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def arena():
  a = Arena.create(1 << 20)
  yield a
  a.close()


@pytest.fixture(scope="module")
def server(arena):
  s = EnclaveServer(_dataset(), KEY)
  reply = _send(s, Op.HELLO, meta=_hello_meta(arena))
  assert reply.op == Op.REPLY, reply.meta
  yield s
  s.close()


@pytest.fixture(scope="module")
def variables(server):
  """Public weights and statistics (He-scaled kernels; ``model.init`` costs ~10 s here)."""
  rng = np.random.default_rng(1)

  def leaf(path, s):
    name = path[-1].key
    if name in ("scale", "var"):
      return np.ones(s.shape, s.dtype)
    if name in ("bias", "mean"):
      return np.zeros(s.shape, s.dtype)
    fan_in = math.prod(s.shape[:-1]) or 1
    return (rng.standard_normal(s.shape) * math.sqrt(2.0 / fan_in)).astype(s.dtype)
  v = jax.tree_util.tree_map_with_path(leaf, jax.eval_shape(server.model.init,
                                                            jax.random.key(0)))
  return v["params"], v["batch_stats"]


def _stage_inputs(server, variables, k, yr=None):
  params, stats = variables
  return (("yr", "conv_output_residual", yr if yr is not None else {}),
          ("params", "public_weights", stg.boundary_params(server.model, server.plan, params, k)),
          ("stats", "public_batch_stats", stg.stage_stats(stats, k)))


def _zeros(template):
  return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), template)


# --------------------------------------------------------------- the fuzzer
# Hypothesis draws the shape of each case (kind, op, sequence number, step,
# stage, mutation) from strategies built once; the bulk details come from a
# numpy generator seeded by a drawn integer, which keeps a case at ~1 ms.
U64 = 2**64 - 1
MUTATIONS = ["drop", "extra", "rename", "class", "shape", "dtype", "offset", "misaligned", "nan"]
MUTATION_CODES = {"drop": "undeclared", "extra": "undeclared", "rename": "undeclared",
                  "class": "undeclared", "shape": "shape", "dtype": "dtype",
                  "offset": "out_of_bounds", "misaligned": "out_of_bounds",
                  "nan": "non_finite"}
JUNK_CLASSES = ["", "image", "label", "bogus", "activation_residual", "loss", "metrics",
                "output_gradient", "x" * 255]
NOT_TO_ENCLAVE = [c for c in list(lg.LEDGER) + JUNK_CLASSES
                  if c not in lg.LEDGER or lg.LEDGER[c].direction != lg.TO_ENCLAVE]
HEADER_FIELDS = [("!H", 4), ("!H", 6), ("!Q", 8), ("!q", 16), ("!i", 24), ("!I", 28),
                 ("!I", 32)]   # version, op, seq, tag, stage, tensor count, metadata length

S_SEED = st.integers(0, 2**32 - 1)
S_KIND_PRE = st.sampled_from(["bytes", "header", "message", "message", "message", "message"])
# After HELLO most cases are frames that reach the tensor checks ("near").
S_KIND_POST = st.sampled_from(["bytes", "header", "message", "message", "near", "near", "near"])
S_SEQ = st.sampled_from(["next"] * 7 + ["replay", "skip", "zero", "random"])
S_OP_PRE = st.sampled_from(list(Op))
S_OP_POST = st.sampled_from([Op.FORWARD] * 6 + [Op.BACKWARD] * 4 + [
    Op.BEGIN, Op.END, Op.STATS, Op.HELLO, Op.WHOLE_STEP, Op.SHUTDOWN, Op.REPLY, Op.ERROR])
S_TAG = st.sampled_from([TRAIN_TAG] * 4 + [EVAL_TAG] * 2 + [0, 7, -5]) | st.integers(
    -2**63, 2**63 - 1)
S_STAGE = st.sampled_from(list(range(9)) * 2 + [-1, 9, 2**31 - 1, -2**31]) | st.integers(
    -2**31, 2**31 - 1)
S_NEAR_TAG = st.sampled_from([TRAIN_TAG] * 6 + [EVAL_TAG] * 3 + [777])
S_NEAR_OP = st.sampled_from([Op.FORWARD] * 3 + [Op.BACKWARD] * 2)
S_NEAR_STAGE = st.integers(0, 8)
S_NEAR_SEQ = st.sampled_from(["next"] * 9 + ["replay"])
S_NEAR_DAMAGE = st.sampled_from(["none"] * 9 + ["flip", "truncate", "field"])
S_MUTATION = st.sampled_from(MUTATIONS)
S_DAMAGE = st.sampled_from(["none"] * 5 + ["flip", "truncate", "extend", "field"])
S_COUNT = st.sampled_from([0, 1, 1, 2, 3, 5, 40, 300])
S_JSON = st.dictionaries(
    st.sampled_from(["train", "index", "code", "arena"]) | st.text(max_size=4),
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=6)
    | st.lists(st.integers(), max_size=3), max_size=3)


class _Rng:
  """Edge-biased random choices for the bulk of a fuzz case."""

  def __init__(self, seed: int):
    self.g = np.random.default_rng(seed)

  def pick(self, seq):
    return seq[int(self.g.integers(len(seq)))]

  def int(self, lo: int, hi: int, edges=()) -> int:
    edges = [e for e in (lo, hi, 0, 1, *edges) if lo <= e <= hi]
    if self.g.random() < 0.5:
      return self.pick(edges)
    return lo + int(self.g.integers(0, 2**62)) * (hi - lo + 1) // 2**62

  def bytes(self, lo: int, hi: int) -> bytes:
    return self.g.bytes(int(self.g.integers(lo, hi + 1)))


def _seq(mode: str, n: int, r: _Rng) -> int:
  return {"next": n, "replay": max(n - 1, 0), "skip": n + 1, "zero": 0,
          "random": r.int(0, U64)}[mode]


def _random_descs(r: _Rng, count: int, names: list[str], region: int) -> list[pr.TensorDesc]:
  out, used = [], set()
  offsets = [0, ALIGN, region - ALIGN, region, region + ALIGN, 2 * region, 2**63, U64 - 63, 3]
  for i in range(count):
    name = r.pick(names + [r.bytes(0, 8).decode("latin-1")]) if i < 8 else f"t{i}"
    if name in used:
      name = f"{name}#{i}"
    used.add(name)
    dtype = r.pick(list(pr.DTYPES.values()))
    shape = tuple(r.int(0, 2**31, (3, 4, 8, 16)) for _ in range(r.int(0, 4)))
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > U64:
      shape, nbytes = (1,), dtype.itemsize
    out.append(pr.TensorDesc(name, r.pick(list(lg.LEDGER) + JUNK_CLASSES), dtype, shape,
                             r.int(0, U64, offsets), nbytes))
  return out


def _near_valid(r: _Rng, mutation: str, server, arena, op, tag, k):
  """A stage's exact tensor set written to the arena, then one mutation.

  A complete, valid set is only sent where it is cheap (stage 0 forward takes no
  tensors): anything else would make the fuzzer compile and run real stages.
  Returns ``(descriptors, mutation)``.
  """
  train = server.train_tags.get(tag, True)
  sig = server.sigs[train][k]
  if op == Op.FORWARD:
    templates = {"yr": ("conv_output_residual", sig["yr"]),
                 "params": ("public_weights", sig["params"]),
                 "stats": ("public_batch_stats", sig["stats"])}
  else:
    templates = {"drs": ("residual_gradient", sig["rs"]),
                 "dloss": ("loss_gradient", jax.ShapeDtypeStruct((), np.float32))}
  items = [(n, cls, np.zeros(s.shape, s.dtype)) for p, (cls, t) in templates.items()
           for n, s in pr.flatten(t, p).items()]
  if not items:
    mutation = r.pick(["none", "extra"])
  nonempty = [i for i, (_, _, a) in enumerate(items) if a.size]
  if mutation == "nan" and not nonempty:
    mutation = "drop"
  if mutation == "nan":
    i = r.pick(nonempty)
    n, cls, a = items[i]
    a = a.copy()
    a.reshape(-1)[r.int(0, a.size - 1)] = r.pick([np.nan, np.inf, -np.inf])
    items[i] = (n, cls, a)
  descs = list(arena.write("request", items))
  if mutation == "extra":
    prefix = r.pick(list(templates))
    descs.append(pr.TensorDesc(f"{prefix}/extra", templates[prefix][0], np.dtype(np.float32),
                               (1,), 0, 4))
  elif mutation not in ("none", "nan"):
    i = r.int(0, len(descs) - 1)
    d = descs[i]
    if mutation == "drop":
      del descs[i]
    elif mutation == "rename":
      descs[i] = d._replace(name=d.name + r.pick(["x", "/x", "/"]))
    elif mutation == "class":
      descs[i] = d._replace(cls=r.pick(NOT_TO_ENCLAVE))
    elif mutation == "shape":
      shape = d.shape + (1,) if not d.shape or r.g.random() < 0.5 else (
          d.shape[:-1] + (d.shape[-1] + r.pick([1, -1 if d.shape[-1] > 1 else 2]),))
      descs[i] = d._replace(shape=shape, nbytes=math.prod(shape) * d.dtype.itemsize)
    elif mutation == "dtype":
      dt = r.pick([t for t in pr.DTYPES.values() if t != d.dtype])
      descs[i] = d._replace(dtype=dt, nbytes=math.prod(d.shape) * dt.itemsize)
    elif mutation == "offset":
      off = r.pick([arena.region - (d.nbytes // ALIGN) * ALIGN, arena.region + ALIGN, 2**63,
                    U64 - 63])
      descs[i] = d._replace(offset=off if off + d.nbytes > arena.region
                                     else arena.region + ALIGN)
    elif mutation == "misaligned":
      descs[i] = d._replace(offset=d.offset + r.int(1, ALIGN - 1))
  return descs, mutation


def _damage(how: str, r: _Rng, body: bytes) -> bytes:
  b = bytearray(body)
  if how == "flip":
    for _ in range(r.int(1, 8)):
      b[r.int(0, len(b) - 1)] ^= 1 << r.int(0, 7)
  elif how == "truncate":
    del b[r.int(0, len(b) - 1):]
  elif how == "extend":
    b += r.bytes(1, 64)
  elif how == "field":
    fmt, off = r.pick(HEADER_FIELDS)
    lo, hi = {"H": (0, 2**16 - 1), "Q": (0, U64), "q": (-2**63, 2**63 - 1),
              "i": (-2**31, 2**31 - 1), "I": (0, 2**32 - 1)}[fmt[1]]
    struct.pack_into(fmt, b, off, r.int(lo, hi, (pr.MAX_TENSORS, pr.MAX_TENSORS + 1,
                                                 pr.MAX_META + 1, 64, 65, 9)))
  return bytes(b)


def _draw_body(data, server, arena, post_hello: bool):
  """One fuzz frame; returns ``(body, expected ERROR code or None)``."""
  n = server.next_seq
  r = _Rng(data.draw(S_SEED))
  kind = data.draw(S_KIND_POST if post_hello else S_KIND_PRE)
  if kind == "bytes":
    prefix = r.pick([b"", pr.MAGIC, pr.MAGIC + b"\0\1", pr.MAGIC + b"\0\1\0\3"])
    return prefix + r.bytes(0, 200), None
  if kind == "header":
    meta = r.pick([b"", b"{}", b"[]", b"{\"train\": true}", b"\xff", r.bytes(0, 40)])
    head = pr.HEADER.pack(
        r.pick([pr.MAGIC] * 4 + [b"AEB2", r.bytes(4, 4)]),
        r.pick([pr.VERSION] * 4 + [0, 2, r.int(0, 2**16 - 1)]),
        r.pick([int(o) for o in Op] + [r.int(0, 2**16 - 1)]),
        _seq(data.draw(S_SEQ), n, r), r.int(-2**63, 2**63 - 1), r.int(-2**31, 2**31 - 1),
        r.int(0, 2**32 - 1, (3, pr.MAX_TENSORS, pr.MAX_TENSORS + 1)),
        r.pick([len(meta), len(meta), len(meta) + 1, pr.MAX_META + 1, r.int(0, 2**32 - 1)]))
    return head + meta + r.bytes(0, 100), None
  if kind == "near":  # a stage's exact tensor set with one mutation
    op, tag, stage = data.draw(S_NEAR_OP), data.draw(S_NEAR_TAG), data.draw(S_NEAR_STAGE)
    seq = _seq(data.draw(S_NEAR_SEQ), n, r)
    tensors, mutation = _near_valid(r, data.draw(S_MUTATION), server, arena, op, tag, stage)
    reaches_read = (seq == n and tag in server.train_tags
                    and (op == Op.FORWARD or server.train_tags[tag]))
    expected = MUTATION_CODES[mutation] if reaches_read and mutation != "none" else None
    body = _frame(server, op, seq=seq, tag=tag, stage=stage, tensors=tensors)
    damaged = _damage(data.draw(S_NEAR_DAMAGE), r, body)
    return damaged, (expected if damaged == body else None)
  # A well-formed message, possibly damaged afterwards.
  op = data.draw(S_OP_POST if post_hello else S_OP_PRE)
  seq = _seq(data.draw(S_SEQ), n, r)
  tag, stage, meta = data.draw(S_TAG), data.draw(S_STAGE), data.draw(S_JSON)
  if op == Op.BEGIN:
    tag = r.pick([TRAIN_TAG, EVAL_TAG, 3, -2, 2**40, tag])
    meta = r.pick([{"train": True}, {"train": False, "index": 0},
                   {"train": False, "index": 7}, meta])
  if op == Op.HELLO:
    # Never the real arena: a HELLO must not succeed during the pre-HELLO fuzz.
    meta = _hello_meta(arena, arena="asymml-fuzz-no-such-arena")
    for key in list(meta):
      if r.g.random() < 0.15:
        if r.g.random() < 0.5:
          del meta[key]
        else:
          meta[key] = r.pick([None, -1, 0, 1e308, "x", [], {}, True])
  names = ["", "params", "yr/", "../etc", "dloss"]
  if post_hello and 0 <= stage < server.model.num_stages:
    sig = server.sigs[True][stage]
    names += [x.lstrip("/") for x in pr.flatten(
        {"yr": sig["yr"], "params": sig["params"], "stats": sig["stats"], "drs": sig["rs"]},
        "")]
  tensors = _random_descs(r, data.draw(S_COUNT), names, arena.region)
  try:
    body = _frame(server, op, seq=seq, tag=tag, stage=stage, meta=meta, tensors=tensors)
  except pr.OversizedFrame:
    body = _frame(server, op, seq=seq, tag=tag, stage=stage)
  return _damage(data.draw(S_DAMAGE), r, body), None


def _check_one(server, body: bytes, expected: str | None, post_hello: bool,
               codes: collections.Counter) -> None:
  before = server.next_seq
  try:
    parsed, decode_error = pr.decode(body), None
  except pr.ProtocolError as e:
    parsed, decode_error = None, e
  t0 = time.monotonic()
  out = server.handle(body)                      # must not raise
  assert time.monotonic() - t0 < CASE_SECONDS
  assert isinstance(out, bytes)
  reply = pr.decode(out)                         # must be a valid frame
  assert reply.op in (Op.REPLY, Op.ERROR)
  if reply.op == Op.ERROR:
    code = reply.meta["code"]
    assert code in pr.ERRORS, reply.meta
    assert isinstance(reply.meta["error"], str) and reply.tensors == ()
    codes[code] += 1
    # The catch-all code is only for configuration a handler converts itself
    # (HELLO's arena name, BEGIN's index); a tensor frame never gets it.
    if code == "enclave":
      assert parsed is not None and parsed.op in (Op.HELLO, Op.BEGIN), reply.meta
  else:
    codes["REPLY"] += 1
    assert parsed is not None and parsed.op in pr.REQUEST_OPS
    for d in reply.tensors:                      # replies stay inside the reply region
      assert lg.check(d.cls, lg.TO_UNTRUSTED)
      assert 0 <= d.offset and d.offset + d.nbytes <= server.arena.region
  if parsed is None:
    assert reply.op == Op.ERROR and reply.meta["code"] == decode_error.code
    assert server.next_seq == before             # a rejected frame does not count
    return
  assert (reply.seq, reply.tag, reply.stage) == (parsed.seq, parsed.tag, parsed.stage)
  if parsed.op not in pr.REQUEST_OPS:
    assert reply.meta["code"] == "unknown_op" and server.next_seq == before
  elif parsed.seq != before:
    assert reply.meta["code"] == "out_of_order" and server.next_seq == before
  else:
    assert server.next_seq == before + 1
    if not post_hello and parsed.op not in (Op.HELLO, Op.SHUTDOWN):
      assert reply.meta["code"] == "state"
    if not post_hello and parsed.op == Op.HELLO:
      assert reply.op == Op.ERROR and server.cfg is None
    if post_hello and parsed.op == Op.HELLO:
      assert reply.meta["code"] == "state"
    if expected is not None:
      assert reply.op == Op.ERROR and reply.meta["code"] == expected, (expected, reply.meta)


def _fuzz(server, arena, n: int, post_hello: bool) -> collections.Counter:
  codes: collections.Counter = collections.Counter()
  calls = [0]

  @settings(max_examples=n, **FUZZ_SETTINGS)
  @given(st.data())
  def run(data):
    if post_hello:  # keep the fuzz's steps open so frames reach the tensor checks
      if TRAIN_TAG not in server.train_tags:
        _ok(_send(server, Op.BEGIN, tag=TRAIN_TAG, meta={"train": True}))
      if EVAL_TAG not in server.train_tags:
        _ok(_send(server, Op.BEGIN, tag=EVAL_TAG, meta={"train": False, "index": 0}))
    body, expected = _draw_body(data, server, arena, post_hello)
    _check_one(server, body, expected, post_hello, codes)
    calls[0] += 1

  run()
  assert calls[0] >= n
  return codes


def _fuzz_before_hello(arena, n):
  server = EnclaveServer(_dataset(), KEY)
  try:
    codes = _fuzz(server, arena, n, post_hello=False)
    assert server.cfg is None and server.arena is None
    # The rejected frames left it able to start: a correct HELLO now succeeds.
    info = _ok(_send(server, Op.HELLO, meta=_hello_meta(arena))).meta
    assert info["num_train"] == 8 and info["image_shape"] == [32, 32, 1]
    _ok(_send(server, Op.STATS))
  finally:
    server.close()
  assert {"malformed", "out_of_order", "state", "unknown_op"} <= set(codes), codes
  return codes


def _fuzz_after_hello(server, arena, variables, n):
  codes = _fuzz(server, arena, n, post_hello=True)
  assert {"malformed", "out_of_order", "state", "undeclared", "shape", "dtype",
          "out_of_bounds", "non_finite"} <= set(codes), codes
  # Still serving: a valid stage 0 and 1 on a fresh step.
  _ok(_send(server, Op.BEGIN, tag=11, meta={"train": True}))
  _ok(_call(server, arena, Op.FORWARD, tag=11, stage=0,
            parts=_stage_inputs(server, variables, 0)))
  _ok(_send(server, Op.END, tag=11))
  return codes


@pytest.mark.fault("garbage_frames")
def test_fuzz_before_hello(arena):
  _fuzz_before_hello(arena, 1000)


@pytest.mark.fault("garbage_frames")
def test_fuzz_after_hello(server, arena, variables):
  _fuzz_after_hello(server, arena, variables, 1000)


@pytest.mark.slow
def test_fuzz_before_hello_slow(arena):
  _fuzz_before_hello(arena, 20_000)


@pytest.mark.slow
def test_fuzz_after_hello_slow(server, arena, variables):
  _fuzz_after_hello(server, arena, variables, 20_000)


# ----------------------------------------------------------- before HELLO
def test_only_hello_or_shutdown_before_hello(arena):
  s = EnclaveServer(_dataset(), KEY)
  try:
    for op in (Op.BEGIN, Op.FORWARD, Op.BACKWARD, Op.END, Op.WHOLE_STEP, Op.STATS):
      assert _code(_send(s, op)) == "state"
    assert s.next_seq == 6
    _ok(_send(s, Op.SHUTDOWN))
    assert s.shutdown
    assert _code(_send(s, Op.HELLO, meta={"backend": "enclave"})) == "malformed"
    assert _code(_send(s, Op.HELLO, meta=_hello_meta(arena, backend="dense"))) == "state"
    assert _code(_send(s, Op.HELLO, meta=_hello_meta(arena, batch_size=9))) == "malformed"
    assert _code(_send(s, Op.HELLO, meta=_hello_meta(arena, decomposition={"bogus": 1}))) == \
        "malformed"
    reply = _send(s, Op.HELLO, meta=_hello_meta(arena, dtype="float16"))
    assert _code(reply) == "malformed" and "float32, float64" in reply.meta["error"]
    assert not jax.config.jax_enable_x64
    assert _code(_send(s, Op.HELLO, meta=_hello_meta(arena, region=4 * arena.region))) == \
        "out_of_bounds"
    assert _code(_send(s, Op.HELLO, meta=_hello_meta(arena, modes={"s0": "dense"}))) == "state"
    assert s.cfg is None
    _ok(_send(s, Op.HELLO, meta=_hello_meta(arena)))
    assert _code(_send(s, Op.HELLO, meta=_hello_meta(arena))) == "state"
  finally:
    s.close()


def test_sequence_numbers_before_hello():
  s = EnclaveServer(_dataset(), KEY)
  assert _code(_send(s, Op.STATS, seq=1)) == "out_of_order"
  assert s.next_seq == 0
  assert _code(_send(s, Op.STATS)) == "state"      # in order, refused, but counted
  assert s.next_seq == 1
  assert _code(_send(s, Op.STATS, seq=0)) == "out_of_order"
  assert _code(_send(s, Op.REPLY)) == "unknown_op"
  assert _code(pr.decode(s.handle(b"garbage"))) == "malformed"
  assert s.next_seq == 1


# ------------------------------------------------------------ after HELLO
def test_hello_reply(server):
  r = _ok(_send(server, Op.STATS)).meta
  assert r["calls"] >= 1 and "traffic_in" in r and "open_steps" in r
  assert server.cfg["model"] == "vgg11" and server.model.num_stages == 9
  assert {p.mode for p in server.plan.sites.values()} <= {"trusted", "per_sample", "dense",
                                                          "per_batch"}


def test_forward_of_an_unknown_step(server):
  assert _code(_send(server, Op.FORWARD, tag=777, stage=0)) == "state"
  assert _code(_send(server, Op.BACKWARD, tag=777, stage=0)) == "state"


def test_begin_refusals(server):
  assert _code(_send(server, Op.BEGIN, tag=-3, meta={"train": True})) == "state"
  assert _code(_send(server, Op.BEGIN, tag=-3, meta={"train": False, "index": 1})) == "state"
  assert _code(_send(server, Op.BEGIN, tag=-3, meta={"train": False, "index": -1})) == "state"
  assert -3 not in server.train_tags
  assert _code(_send(server, Op.WHOLE_STEP, tag=0)) == "state"


def test_stage_out_of_range(server):
  _ok(_send(server, Op.BEGIN, tag=21, meta={"train": True}))
  for k in (-1, server.model.num_stages, 2**31 - 1):
    assert _code(_send(server, Op.FORWARD, tag=21, stage=k)) == "state"
    assert _code(_send(server, Op.BACKWARD, tag=21, stage=k)) == "state"
  _ok(_send(server, Op.END, tag=21))


def test_stage_1_before_stage_0(server, arena, variables):
  _ok(_send(server, Op.BEGIN, tag=22, meta={"train": True}))
  reply = _call(server, arena, Op.FORWARD, tag=22, stage=1,
                parts=_stage_inputs(server, variables, 1))
  assert _code(reply) == "state" and "before stage 0" in reply.meta["error"]
  _ok(_send(server, Op.END, tag=22))


def test_undeclared_tensors(server, arena, variables):
  _ok(_send(server, Op.BEGIN, tag=23, meta={"train": True}))
  # Stage 0 takes no tensors at all: anything is unexpected.
  for cls in ("public_weights", "image", "activation_residual"):
    reply = _call(server, arena, Op.FORWARD, tag=23, stage=0,
                  parts=(("params", cls, {"x": np.zeros(3, np.float32)}),))
    assert _code(reply) == "undeclared"
  # The right names under a class the ledger does not declare towards the enclave.
  inputs = _stage_inputs(server, variables, 1)
  for cls in ("bogus", "activation_residual", "loss"):
    items = _items(inputs)
    name, _, a = items[0]
    items[0] = (name, cls, a)
    assert _code(_send(server, Op.FORWARD, tag=23, stage=1,
                       tensors=arena.write("request", items))) == "undeclared"
  # A missing and an extra tensor.
  items = _items(inputs)
  assert _code(_send(server, Op.FORWARD, tag=23, stage=1,
                     tensors=arena.write("request", items[1:]))) == "undeclared"
  items.append(("stats/extra", "public_batch_stats", np.zeros(2, np.float32)))
  assert _code(_send(server, Op.FORWARD, tag=23, stage=1,
                     tensors=arena.write("request", items))) == "undeclared"
  _ok(_send(server, Op.END, tag=23))


def test_wrong_shape_and_dtype(server, arena, variables):
  _ok(_send(server, Op.BEGIN, tag=24, meta={"train": True}))
  params, stats = variables
  p1 = stg.boundary_params(server.model, server.plan, params, 1)
  name = sorted(p1["next"])[0]  # a kernel stage 1 carries for the next group (overlap)
  kernel = p1["next"][name]
  bad = jax.tree_util.tree_map(lambda x: x, p1)
  bad["next"][name] = np.zeros(kernel.shape[:-1] + (kernel.shape[-1] + 1,), np.float32)
  stats1 = ("stats", "public_batch_stats", stg.stage_stats(stats, 1))
  reply = _call(server, arena, Op.FORWARD, tag=24, stage=1,
                parts=(("params", "public_weights", bad), stats1))
  assert _code(reply) == "shape" and f"next/{name}" in reply.meta["error"]
  for dtype in (np.float16, BF16, np.int32):
    bad["next"][name] = np.asarray(kernel).astype(dtype)
    reply = _call(server, arena, Op.FORWARD, tag=24, stage=1,
                  parts=(("params", "public_weights", bad), stats1))
    assert _code(reply) == "dtype"
  # Scalar where a vector is expected (0-d arrays keep their shape through the arena).
  bad = jax.tree_util.tree_map(lambda x: x, p1)
  bad["stage"]["Norm_0"]["BatchNorm_0"]["bias"] = np.float32(0)
  reply = _call(server, arena, Op.FORWARD, tag=24, stage=1,
                parts=(("params", "public_weights", bad), stats1))
  assert _code(reply) == "shape"
  _ok(_send(server, Op.END, tag=24))


def _first_stage_with_yr(server) -> int:
  return next(k for k, s in enumerate(server.sigs[True]) if s["yr"])


@pytest.mark.fault("nan_from_accelerator")
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_from_the_accelerator(server, arena, variables, bad):
  _ok(_send(server, Op.BEGIN, tag=25, meta={"train": True}))
  k = _first_stage_with_yr(server)
  yr = _zeros(server.sigs[True][k]["yr"])
  name = sorted(yr)[0]
  yr[name].reshape(-1)[17] = bad
  reply = _call(server, arena, Op.FORWARD, tag=25, stage=k,
                parts=_stage_inputs(server, variables, k, yr))
  assert _code(reply) == "non_finite" and name in reply.meta["error"]
  # Also in the public weights and in a backward cotangent.
  parts = list(_stage_inputs(server, variables, 1))
  params = jax.tree_util.tree_map(np.array, parts[1][2])
  params["convs"]["conv0"]["kernel"][0, 0, 0, 0] = bad
  parts[1] = ("params", "public_weights", params)
  assert _code(_call(server, arena, Op.FORWARD, tag=25, stage=1, parts=parts)) == "non_finite"
  reply = _call(server, arena, Op.BACKWARD, tag=25, stage=server.model.num_stages - 1,
                parts=(("dloss", "loss_gradient", np.float32(bad)),))
  assert _code(reply) == "non_finite"
  _ok(_send(server, Op.END, tag=25))


def test_descriptors_outside_the_arena(server, arena, variables):
  _ok(_send(server, Op.BEGIN, tag=26, meta={"train": True}))
  descs = list(arena.write("request", _items(_stage_inputs(server, variables, 1))))
  i = max(range(len(descs)), key=lambda j: descs[j].nbytes)
  for off in (arena.region, arena.region - ALIGN, 2**63, descs[i].offset + 4):
    bad = list(descs)
    bad[i] = descs[i]._replace(offset=off)
    reply = _send(server, Op.FORWARD, tag=26, stage=1, tensors=bad)
    assert _code(reply) == "out_of_bounds"
  _ok(_send(server, Op.END, tag=26))


@pytest.mark.fault("shm_truncated")
def test_arena_truncated_under_the_enclave(server, arena, variables):
  """The driver's side shrinks the arena after writing a request: the enclave refuses
  it (``out_of_bounds``) instead of touching unmapped pages, and serves on."""
  import os
  _ok(_send(server, Op.BEGIN, tag=27, meta={"train": True}))
  _ok(_call(server, arena, Op.FORWARD, tag=27, stage=0,
            parts=_stage_inputs(server, variables, 0)))
  descs = arena.write("request", _items(_stage_inputs(server, variables, 1)))
  assert descs  # stage 1 reads tensors from the arena
  os.ftruncate(arena.shm._fd, arena.region)  # noqa: SLF001 - the untrusted side's act
  try:
    reply = _send(server, Op.FORWARD, tag=27, stage=1, tensors=descs)
    assert _code(reply) == "out_of_bounds" and "truncated" in reply.meta["error"]
  finally:
    os.ftruncate(arena.shm._fd, 2 * arena.region)  # noqa: SLF001
  _ok(_call(server, arena, Op.FORWARD, tag=27, stage=1,
            parts=_stage_inputs(server, variables, 1)))
  _ok(_send(server, Op.END, tag=27))


@pytest.mark.fault("oversize_frames")
def test_an_announced_oversized_frame_is_answered_then_dropped():
  import socket
  from enclave_bridge import server as srv
  from enclave_bridge.transport import Channel, ChannelClosed
  a, b = socket.socketpair()
  driver, enclave = Channel(a), Channel(b)
  a.sendall(pr.LENGTH.pack(pr.MAX_FRAME + 1) + b"x" * 100)
  s = EnclaveServer(_dataset(), KEY)
  try:
    srv.serve(s, enclave)  # returns: the stream cannot be resynchronised
    reply = pr.decode(driver.recv(timeout=CASE_SECONDS))
    assert _code(reply) == "oversized"
    enclave.close()
    with pytest.raises((ChannelClosed, ConnectionError)):
      driver.recv(timeout=CASE_SECONDS)
  finally:
    driver.close()
    s.close()


@pytest.mark.fault("replayed_frames")
def test_replayed_and_reordered_frames(server):
  body = _frame(server, Op.STATS)
  n = server.next_seq
  first = pr.decode(server.handle(body))
  assert first.op == Op.REPLY and first.seq == n and server.next_seq == n + 1
  replay = pr.decode(server.handle(body))
  assert _code(replay) == "out_of_order" and replay.seq == n
  assert server.next_seq == n + 1  # the rejected frame does not advance it
  assert _code(_send(server, Op.STATS, seq=n + 2)) == "out_of_order"
  assert _code(_send(server, Op.STATS, seq=U64)) == "out_of_order"
  assert server.next_seq == n + 1
  _ok(_send(server, Op.STATS, seq=n + 1))
  assert server.next_seq == n + 2


def test_backward_of_an_eval_step(server):
  _ok(_send(server, Op.BEGIN, tag=-2, meta={"train": False, "index": 0}))
  reply = _send(server, Op.BACKWARD, tag=-2, stage=server.model.num_stages - 1)
  assert _code(reply) == "state" and "eval" in reply.meta["error"]
  _ok(_send(server, Op.END, tag=-2))
  assert -2 not in server.train_tags


def test_bfloat16_residuals_are_checked_finite(arena, variables):
  s = EnclaveServer(_dataset(), KEY)
  try:
    _ok(_send(s, Op.HELLO, meta=_hello_meta(arena, residual_dtype="bfloat16")))
    _ok(_send(s, Op.BEGIN, tag=0, meta={"train": True}))
    k = _first_stage_with_yr(s)
    yr = _zeros(s.sigs[True][k]["yr"])
    assert {a.dtype for a in yr.values()} == {BF16}
    yr[sorted(yr)[0]].reshape(-1)[3] = np.nan
    reply = _call(s, arena, Op.FORWARD, tag=0, stage=k, parts=_stage_inputs(s, variables, k, yr))
    assert _code(reply) == "non_finite"
  finally:
    s.close()


# -------------------------------------------------------------- happy path
def _read_reply(arena, reply, expect: dict):
  descs = {d.name: d for d in reply.tensors}
  for prefix, template in expect.items():
    pr.check_against(template, prefix, descs)
  known = set().union(*[set(pr.flatten(t, p)) for p, t in expect.items()])
  assert set(descs) <= known, set(descs) - known
  values = {n: arena.read("reply", d) for n, d in descs.items()}
  return {p: pr.rebuild(t, p, values) for p, t in expect.items()}


def test_a_training_step_through_the_server(server, arena, variables):
  model, plan = server.model, server.plan
  params, stats = variables
  tag, last = 3, model.num_stages - 1
  server.traffic_in, server.traffic_out = lg.Traffic(), lg.Traffic()
  meta = _ok(_send(server, Op.BEGIN, tag=tag, meta={"train": True})).meta
  assert meta["batch_size"] == 4
  yr, residuals = {}, []
  for k in range(model.num_stages):
    sig = server.sigs[True][k]
    expect = {"rs": sig["rs"], "stats": sig["new_stats"]}
    if k == last:
      expect.update(loss=sig["loss"], metrics=sig["metrics"])
    reply = _ok(_call(server, arena, Op.FORWARD, tag=tag, stage=k,
                      parts=_stage_inputs(server, variables, k, yr)))
    assert {d.cls for d in reply.tensors} <= {"activation_residual", "batch_statistics",
                                               "loss", "metrics"}
    out = _read_reply(arena, reply, expect)
    rs = out["rs"] or {}
    assert all(np.all(np.isfinite(r)) for r in rs.values())
    residuals.append(rs)
    if k == 0:  # handlers are idempotent for a repeated (step, stage)
      again = _read_reply(arena, _ok(_call(server, arena, Op.FORWARD, tag=tag, stage=0,
                                           parts=_stage_inputs(server, variables, 0))),
                          expect)
      jax.tree_util.tree_map(np.testing.assert_array_equal, again, out)
    if k < last:
      yr = jax.device_get(stg.untrusted_group(model, plan, k, params["convs"], rs))
  loss, metrics = float(out["loss"]), out["metrics"]
  assert np.isfinite(loss) and 0 < loss < 20
  assert float(metrics["count"]) == 4 and 0 <= float(metrics["correct"]) <= 4
  assert float(metrics["loss_sum"]) == pytest.approx(4 * loss, rel=1e-5)

  # Backward through every stage, the accelerator's part done here as the client would.
  dyr = {}
  for k in reversed(range(model.num_stages)):
    sig = server.sigs[True][k]
    if k == last:
      drs = {}
    else:
      _, vjp = jax.vjp(lambda r, k=k: stg.untrusted_group(model, plan, k, params["convs"], r),
                       residuals[k])
      (drs,) = jax.device_get(vjp(dyr))
    reply = _ok(_call(server, arena, Op.BACKWARD, tag=tag, stage=k,
                      parts=(("drs", "residual_gradient", drs),
                             ("dloss", "loss_gradient", np.float32(1.0)))))
    out = _read_reply(arena, reply, {"dyr": sig["yr"], "dparams": sig["params"]})
    dyr = out["dyr"] or {}
    flat = pr.flatten(out["dparams"], "g")
    assert all(np.all(np.isfinite(g)) for g in flat.values())
    if k == last:
      assert any(np.any(g != 0) for g in flat.values())
  assert tag not in server.executor.open_steps  # state dropped after stage 0's backward
  # Ledger against what actually crossed (enclave backend, BatchNorm, gradient protection).
  crossed = server.traffic_in.classes() | server.traffic_out.classes()
  assert crossed <= lg.expected_classes("enclave", train=True, batch_norm=True)
  assert {c for c in server.traffic_in.classes()
          if lg.LEDGER[c].direction != lg.TO_ENCLAVE} == set()
  assert {c for c in server.traffic_out.classes()
          if lg.LEDGER[c].direction != lg.TO_UNTRUSTED} == set()
  assert "output_gradient_residual" in crossed and "activation_residual" in crossed
  assert "output_gradient" not in crossed
  _ok(_send(server, Op.END, tag=tag))


def test_trusted_seed_is_keyed():
  assert trusted_seed(KEY, 0) == trusted_seed(KEY, 0)
  assert trusted_seed(KEY, 0) != trusted_seed(KEY, 1)
  assert trusted_seed(KEY, 0) != trusted_seed(b"j" * 32, 0)
  assert 0 <= trusted_seed(KEY, -5) < 2**63


# ------------------------------------------------------------------ privacy
DP_HELLO = dict(norm="group", batch_size=8, expected_batch_size=2.0,
                privacy=dict(enabled=True, clip=0.1, grad_clip=1e-4, noise_multiplier=1.0,
                             delta=1e-5))


@pytest.mark.parametrize("change, words", [
    (dict(norm="batch"), "BatchNorm mixes samples"),
    (dict(decomposition=dataclasses.asdict(DecompositionConfig(scope="per_batch"))),
     "per_batch"),
    (dict(privacy={**DP_HELLO["privacy"], "delta": 0.2}), "delta must be < 1/N"),
    (dict(privacy={**DP_HELLO["privacy"], "noise_multiplier": 0.0}), "epsilon = inf"),
    (dict(privacy={**DP_HELLO["privacy"], "gradient_protection": "none"}), "dY would leave"),
    (dict(batch_size=7), "padded Poisson size 8"),
    (dict(expected_batch_size=None), "needs expected_batch_size"),
])
def test_enclave_enforces_the_dp_rules_itself(arena, change, words):
  """Whatever the untrusted side asks for, the enclave refuses an unsound DP setup."""
  s = EnclaveServer(_dataset(), KEY)
  try:
    reply = _send(s, Op.HELLO, meta=_hello_meta(arena, **{**DP_HELLO, **change}))
    assert _code(reply) == "state" and words in reply.meta["error"], reply.meta
    assert s.cfg is None
  finally:
    s.close()


def test_enclave_samples_poisson_batches_with_its_own_seed(arena):
  s = EnclaveServer(_dataset(), KEY)
  try:
    _ok(_send(s, Op.HELLO, meta=_hello_meta(arena, **DP_HELLO)))
    assert s.plan.privacy.enabled and s.plan.expected_batch_size == 2.0
    sizes = set()
    for tag in range(12):
      meta = _ok(_send(s, Op.BEGIN, tag=tag, meta={"train": True})).meta
      assert meta["batch_size"] == 8  # padded: the shape never changes
      batch = s._batch(tag, True, 0)
      sizes.add(int(batch["mask"].sum()))
      _ok(_send(s, Op.END, tag=tag))
    assert len(sizes) > 1  # the realised size varies (Poisson), hidden behind the mask
    assert s.sampler_seed != s.seed  # not derivable from the public run seed alone
  finally:
    s.close()


def test_deferred_work_is_split_into_overlapped_and_waited_for(server):
  """The prefetch after a reply (DESIGN section 3 step 3) counts as overlap up to
  the moment the next request was sent; the rest delayed that request."""
  server._deferred = (10.0, 0.5)
  assert server._deferred_share(10.2) == pytest.approx(
      {"overlap_s": 0.2, "deferred_exposed_s": 0.3})
  assert server._deferred_share(10.2) == {}  # reported once
  server._deferred = (10.0, 0.5)
  assert server._deferred_share(11.0)["overlap_s"] == pytest.approx(0.5)  # all hidden
  server._deferred = (10.0, 0.5)
  assert server._deferred_share(9.0)["deferred_exposed_s"] == pytest.approx(0.5)
  server._deferred = (10.0, 0.5)
  assert server._deferred_share("x")["overlap_s"] == 0.0  # no usable clock: none hidden


# ------------------------------------------- the listener: transports and the secret
def _serve_in_thread(server, transport_name, tmp_path):
  import threading
  from enclave_bridge import server as srv
  from enclave_bridge import transport
  path = str(tmp_path / "s.sock") if len(str(tmp_path)) < 90 else ""
  listener, address = transport.listen(transport_name, path or "/tmp/asymml-test-s.sock")
  result = {}
  t = threading.Thread(target=lambda: result.setdefault("ok", srv.serve_listener(server,
                                                                                 listener)),
                       daemon=True)
  t.start()
  return address, listener, t, result


def _exchange(channel, op, seq, meta=None, tensors=()):
  channel.send(pr.encode(pr.Message(op, seq, 0, 0, dict(meta or {}), tuple(tensors))))
  return pr.decode(channel.recv(timeout=CASE_SECONDS))


@pytest.mark.fault("garbage_frames")
@pytest.mark.parametrize("transport_name", ["unix", "tcp"])
def test_only_the_driver_with_the_launch_secret_gets_in(arena, tmp_path, transport_name):
  from enclave_bridge import auth
  from enclave_bridge.transport import Channel, ChannelClosed
  secret = auth.new_secret()
  server = EnclaveServer(_dataset(), KEY, secret)
  address, listener, thread, result = _serve_in_thread(server, transport_name, tmp_path)
  try:
    rng = np.random.default_rng(0)
    intruders = [
        (Op.HELLO, _hello_meta(arena)),                                   # no proof
        (Op.HELLO, {**_hello_meta(arena), **auth.hello_fields(auth.new_secret())}),
        (Op.SHUTDOWN, {}),                                                # stop it
        (Op.STATS, {}),
    ]
    for op, meta in intruders:
      c = Channel.connect(address, timeout=5)
      reply = _exchange(c, op, 0, meta)
      assert reply.op == Op.ERROR and reply.meta["code"] in ("auth", "state"), reply.meta
      with pytest.raises((ChannelClosed, ConnectionError)):  # and it was dropped
        c.recv(timeout=CASE_SECONDS)
      c.close()
    # Garbage on the wire before HELLO: an error reply or a drop, never a hang.
    for _ in range(8):
      c = Channel.connect(address, timeout=5)
      c.send(bytes(rng.integers(0, 256, int(rng.integers(0, 200)), dtype=np.uint8)))
      try:
        assert pr.decode(c.recv(timeout=CASE_SECONDS)).op == Op.ERROR
      except (ChannelClosed, ConnectionError):
        pass
      c.close()
    assert server.cfg is None and thread.is_alive()
    # The real driver: proves the secret, and the reply proves it back.
    c = Channel.connect(address, timeout=5)
    hello = {**_hello_meta(arena), **auth.hello_fields(secret)}
    reply = _exchange(c, Op.HELLO, 0, hello)
    assert reply.op == Op.REPLY, reply.meta
    auth.check_reply(secret, hello, reply.meta)
    assert _exchange(c, Op.SHUTDOWN, 1).op == Op.REPLY
    thread.join(CASE_SECONDS)
    assert result == {"ok": True}
    c.close()
  finally:
    listener.close()
    server.close()
