"""Tests of enclave_bridge.protocol: framing, validation and tree <-> name helpers (DESIGN 6)."""

from __future__ import annotations

import json
import math
import struct

import jax
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enclave_bridge import protocol as pr

Op = pr.Op
DTYPES = [np.dtype(np.float32), np.dtype(np.int32), np.dtype(np.float16),
          np.dtype(ml_dtypes.bfloat16)]
FAST = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------- strategies
json_leaves = (st.none() | st.booleans() | st.integers(-2**100, 2**100)
               | st.floats(allow_nan=False) | st.text(max_size=20))
json_values = st.recursive(
    json_leaves,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)
metas = st.dictionaries(st.text(max_size=10), json_values, max_size=5)


@st.composite
def descriptors(draw):
  dtype = draw(st.sampled_from(DTYPES))
  shape = tuple(draw(st.lists(st.integers(0, 64), max_size=pr.MAX_NDIM)))
  return dict(cls=draw(st.text(st.characters(max_codepoint=127), max_size=40)), dtype=dtype,
              shape=shape, offset=draw(st.integers(0, 2**64 - 1)),
              nbytes=math.prod(shape) * dtype.itemsize)


@st.composite
def messages(draw):
  names = draw(st.lists(st.text(max_size=30), max_size=5, unique=True))
  tensors = tuple(pr.TensorDesc(name=n, **draw(descriptors())) for n in names)
  return pr.Message(op=draw(st.sampled_from(list(Op))), seq=draw(st.integers(0, 2**64 - 1)),
                    tag=draw(st.integers(-2**63, 2**63 - 1)),
                    stage=draw(st.integers(-2**31, 2**31 - 1)), meta=draw(metas),
                    tensors=tensors)


def _msg(**kw) -> pr.Message:
  base = dict(op=Op.FORWARD, seq=3, tag=-2, stage=1, meta={"a": 1},
              tensors=(pr.TensorDesc("yr/conv1", "conv_output_residual", np.dtype(np.float32),
                                     (2, 3), 64, 24),))
  base.update(kw)
  return pr.Message(**base)


def _header(*, magic=pr.MAGIC, version=pr.VERSION, op=int(Op.HELLO), seq=0, tag=0, stage=0,
            n_tensors=0, meta_len=0) -> bytes:
  return pr.HEADER.pack(magic, version, op, seq, tag, stage, n_tensors, meta_len)


def _with_meta(meta: bytes) -> bytes:
  return _header(meta_len=len(meta)) + meta


# ----------------------------------------------------------------- round trip
@FAST
@given(messages())
def test_encode_decode_round_trip(msg):
  body = pr.encode(msg)
  assert len(body) <= pr.MAX_FRAME
  out = pr.decode(body)
  assert out == msg
  assert isinstance(out.op, Op)
  assert all(isinstance(t.dtype, np.dtype) for t in out.tensors)
  assert pr.decode(bytearray(body)) == msg and pr.decode(memoryview(body)) == msg


def test_header_layout():
  body = pr.encode(_msg(meta={}, tensors=()))
  assert pr.HEADER.size == 36 and body[36:] == b"{}"  # (the module docstring says so)
  assert body[:4] == b"AEB1"
  assert pr.HEADER.unpack(body[:36]) == (b"AEB1", 1, int(Op.FORWARD), 3, -2, 1, 0, 2)


def test_every_prefix_of_a_valid_frame_is_malformed():
  body = pr.encode(_msg(meta={"config": [1, 2, {"x": "y"}]}, tensors=(
      pr.TensorDesc("a", "public_weights", np.dtype(np.float32), (3, 4), 0, 48),
      pr.TensorDesc("b/c", "public_batch_stats", np.dtype(ml_dtypes.bfloat16), (), 64, 2),
      pr.TensorDesc("\u00e9", "loss", np.dtype(np.int32), (0, 7), 128, 0))))
  assert pr.decode(body).tensors[2].name == "\u00e9"
  for n in range(len(body)):
    with pytest.raises(pr.MalformedFrame):
      pr.decode(body[:n])


@FAST
@given(messages(), st.data())
def test_random_truncations_and_extensions(msg, data):
  body = pr.encode(msg)
  n = data.draw(st.integers(0, len(body) - 1))
  with pytest.raises(pr.MalformedFrame):
    pr.decode(body[:n])
  tail = data.draw(st.binary(min_size=1, max_size=64))
  with pytest.raises(pr.MalformedFrame, match="trailing"):
    pr.decode(body + tail)


def test_not_bytes():
  with pytest.raises(pr.MalformedFrame):
    pr.decode("AEB1")  # type: ignore[arg-type]


# ----------------------------------------------------------- header fields
@pytest.mark.parametrize("magic", [b"AEB0", b"\0\0\0\0", b"1BEA", b"aeb1"])
def test_bad_magic(magic):
  body = bytearray(pr.encode(_msg()))
  body[:4] = magic
  with pytest.raises(pr.MalformedFrame, match="magic"):
    pr.decode(bytes(body))


@pytest.mark.parametrize("version", [0, 2, 255, 65535])
def test_bad_version(version):
  body = bytearray(pr.encode(_msg()))
  body[4:6] = struct.pack("!H", version)
  with pytest.raises(pr.UnsupportedVersion) as e:
    pr.decode(bytes(body))
  assert e.value.code == "version"


@pytest.mark.parametrize("op", [0, 9, 63, 66, 1000, 65535])
def test_unknown_op(op):
  body = bytearray(pr.encode(_msg()))
  body[6:8] = struct.pack("!H", op)
  with pytest.raises(pr.UnknownOp):
    pr.decode(bytes(body))


def test_reply_and_error_ops_decode():
  for op in (Op.REPLY, Op.ERROR):
    assert pr.decode(pr.encode(_msg(op=op))).op == op
  assert Op.REPLY not in pr.REQUEST_OPS and Op.ERROR not in pr.REQUEST_OPS
  assert Op.HELLO in pr.REQUEST_OPS and Op.SHUTDOWN in pr.REQUEST_OPS


# ----------------------------------------------------------------- sizes
def test_oversized_body():
  with pytest.raises(pr.OversizedFrame):
    pr.decode(b"\0" * (pr.MAX_FRAME + 1))
  with pytest.raises(pr.OversizedFrame):
    pr.decode(_with_meta(b" " * (pr.MAX_FRAME + 1 - pr.HEADER.size)))


def test_encode_refuses_an_oversized_frame():
  with pytest.raises(pr.OversizedFrame):
    pr.encode(_msg(meta={"x": "a" * pr.MAX_FRAME}))


def test_too_many_tensors_announced():
  with pytest.raises(pr.OversizedFrame, match="tensors"):
    pr.decode(_header(n_tensors=pr.MAX_TENSORS + 1))
  with pytest.raises(pr.OversizedFrame):
    pr.decode(_header(n_tensors=2**32 - 1))
  # At the limit the count is accepted, and the missing descriptors are a truncation.
  with pytest.raises(pr.MalformedFrame):
    pr.decode(_header(n_tensors=pr.MAX_TENSORS))


def test_too_much_metadata_announced():
  with pytest.raises(pr.OversizedFrame, match="metadata"):
    pr.decode(_header(meta_len=pr.MAX_META + 1))
  with pytest.raises(pr.OversizedFrame):
    pr.decode(_header(meta_len=2**32 - 1))
  with pytest.raises(pr.MalformedFrame):
    pr.decode(_header(meta_len=pr.MAX_META))


def test_max_tensors_round_trip():
  tensors = tuple(pr.TensorDesc(f"t{i}", "public_weights", np.dtype(np.float32), (1,),
                                64 * i, 4) for i in range(pr.MAX_TENSORS))
  assert len(pr.decode(pr.encode(_msg(tensors=tensors))).tensors) == pr.MAX_TENSORS


# ------------------------------------------------------------- descriptors
def _one_tensor_frame(name=b"x", cls=b"public_weights", code=1, shape=(2, 3), offset=0,
                      nbytes=None, ndim=None) -> bytes:
  nbytes = math.prod(shape) * 4 if nbytes is None else nbytes
  ndim = len(shape) if ndim is None else ndim
  desc = (struct.pack("!H", len(name)) + name + struct.pack("!B", len(cls)) + cls
          + struct.pack("!BB", code, ndim) + struct.pack(f"!{len(shape)}I", *shape)
          + struct.pack("!QQ", offset, nbytes))
  return _header(n_tensors=1) + desc


def test_hand_built_descriptor_decodes():
  t, = pr.decode(_one_tensor_frame()).tensors
  assert t == pr.TensorDesc("x", "public_weights", np.dtype(np.float32), (2, 3), 0, 24)


@pytest.mark.parametrize("nbytes", [0, 23, 25, 48, 2**64 - 1])
def test_nbytes_inconsistent_with_shape(nbytes):
  with pytest.raises(pr.MalformedFrame, match="bytes for shape"):
    pr.decode(_one_tensor_frame(nbytes=nbytes))


def test_nbytes_of_every_dtype():
  for code, dt in pr.DTYPES.items():
    frame = _one_tensor_frame(code=code, nbytes=6 * dt.itemsize)
    assert pr.decode(frame).tensors[0].dtype == dt
    with pytest.raises(pr.MalformedFrame):
      pr.decode(_one_tensor_frame(code=code, nbytes=6 * dt.itemsize + 1))


def test_huge_shapes_do_not_fit_nbytes():
  with pytest.raises(pr.MalformedFrame):
    pr.decode(_one_tensor_frame(shape=(2**32 - 1,) * 8, nbytes=2**64 - 1))


@pytest.mark.parametrize("code", [0, 6, 255])
def test_unknown_dtype_code(code):
  with pytest.raises(pr.DtypeMismatch):
    pr.decode(_one_tensor_frame(code=code))


def test_too_many_dimensions():
  shape = (1,) * (pr.MAX_NDIM + 1)
  with pytest.raises(pr.MalformedFrame, match="dimensions"):
    pr.decode(_one_tensor_frame(shape=shape))


def test_too_long_name():
  with pytest.raises(pr.MalformedFrame, match="name"):
    pr.decode(_one_tensor_frame(name=b"n" * (pr.MAX_NAME + 1)))
  assert pr.decode(_one_tensor_frame(name=b"n" * pr.MAX_NAME)).tensors[0].name == "n" * 512


@pytest.mark.parametrize("name,cls", [(b"\xff\xfe", b"public_weights"), (b"x", b"\xc3\xa9")])
def test_names_and_classes_must_be_text(name, cls):
  with pytest.raises(pr.MalformedFrame, match="text"):
    pr.decode(_one_tensor_frame(name=name, cls=cls))


def test_trailing_bytes():
  with pytest.raises(pr.MalformedFrame, match="trailing"):
    pr.decode(pr.encode(_msg()) + b"\0")
  with pytest.raises(pr.MalformedFrame, match="trailing"):
    pr.decode(_header() + b"{}")  # metadata not announced


def test_duplicate_names():
  t = _msg().tensors[0]
  body = pr.encode(_msg(tensors=(t, t._replace(offset=128))))
  with pytest.raises(pr.MalformedFrame, match="duplicate"):
    pr.decode(body)


# ---------------------------------------------------------------- metadata
@pytest.mark.parametrize("meta", [
    b"{not json", b"{\"a\": 1", b"\xff\xfe{}", b"{\"a\": \"\xc3\"}", b"\0",
    b"[" * 100_000, b"{\"a\": " + b"9" * 5000 + b"}",
], ids=["syntax", "unterminated", "not-utf8", "bad-utf8-in-string", "nul", "deep-nesting",
        "huge-integer"])
def test_metadata_not_json(meta):
  with pytest.raises(pr.MalformedFrame, match="JSON"):
    pr.decode(_with_meta(meta))


@pytest.mark.parametrize("meta", [b"[1, 2]", b"[]", b"\"x\"", b"3", b"null", b"true"])
def test_metadata_must_be_an_object(meta):
  with pytest.raises(pr.MalformedFrame, match="JSON object"):
    pr.decode(_with_meta(meta))


def test_empty_metadata_is_an_empty_object():
  assert pr.decode(_header()).meta == {}
  assert pr.decode(_with_meta(b" {\"a\": [1]} ")).meta == {"a": [1]}


@FAST
@given(st.binary(max_size=200))
def test_decode_raises_only_protocol_errors(body):
  try:
    pr.decode(body)
  except pr.ProtocolError:
    pass


@FAST
@given(messages(), st.data())
def test_decode_of_bit_flipped_frames_raises_only_protocol_errors(msg, data):
  body = bytearray(pr.encode(msg))
  for _ in range(data.draw(st.integers(1, 4))):
    i = data.draw(st.integers(0, len(body) - 1))
    body[i] ^= 1 << data.draw(st.integers(0, 7))
  try:
    out = pr.decode(bytes(body))
  except pr.ProtocolError:
    return
  assert isinstance(out, pr.Message)


# ------------------------------------------------------------------ errors
def test_errors_registry():
  assert set(pr.ERRORS) == {c.code for c in pr.ERRORS.values()}
  assert len(pr.ERRORS) == 15  # ... AuthenticationFailed ("auth")
  for code, cls in pr.ERRORS.items():
    assert issubclass(cls, pr.ProtocolError) and cls.code == code


@pytest.mark.parametrize("cls", list(pr.ERRORS.values()), ids=list(pr.ERRORS))
def test_raise_error_maps_codes_back(cls):
  reply = pr.decode(pr.encode(pr.error_message(7, -3, 2, cls("went wrong"))))
  assert reply.op == Op.ERROR and (reply.seq, reply.tag, reply.stage) == (7, -3, 2)
  assert reply.meta["code"] == cls.code and reply.tensors == ()
  with pytest.raises(cls) as e:
    pr.raise_error(reply)
  assert type(e.value) is cls
  assert "went wrong" in str(e.value)


def test_unexpected_exceptions_become_enclave_failures():
  msg = pr.error_message(0, 0, 0, ZeroDivisionError("boom"))
  assert msg.meta == {"code": "enclave", "error": "ZeroDivisionError: boom"}
  with pytest.raises(pr.EnclaveFailure, match="boom"):
    pr.raise_error(pr.decode(pr.encode(msg)))


def test_unknown_or_missing_code_is_a_protocol_error():
  for meta in ({"code": "nope", "error": "x"}, {}, {"code": 3}):
    with pytest.raises(pr.ProtocolError) as e:
      pr.raise_error(pr.Message(Op.ERROR, 0, 0, 0, meta, ()))
    assert type(e.value) is pr.ProtocolError


def test_error_text_is_bounded():
  msg = pr.error_message(0, 0, 0, pr.MalformedFrame("x" * 100_000))
  assert len(msg.meta["error"]) == 4000
  assert len(pr.encode(msg)) < pr.MAX_FRAME


# ------------------------------------------------------------------- trees
keys = st.text(st.characters(blacklist_characters="/"), min_size=1, max_size=6)
leaves = st.builds(lambda shape, dt: np.zeros(shape, dt),
                   st.lists(st.integers(0, 3), max_size=3).map(tuple), st.sampled_from(DTYPES))
trees = st.recursive(leaves | st.none(),
                     lambda inner: st.dictionaries(keys, inner, max_size=4), max_leaves=10)


def _same(a, b):
  if isinstance(a, dict):
    assert isinstance(b, dict) and set(a) == set(b)
    for k in a:
      _same(a[k], b[k])
  elif a is None:
    assert b is None
  else:
    assert b is a


@FAST
@given(trees)
def test_flatten_rebuild_round_trip(tree):
  flat = pr.flatten(tree, "params")
  assert all(n == "params" or n.startswith("params/") for n in flat)
  assert all(not isinstance(v, dict) and v is not None for v in flat.values())
  _same(tree, pr.rebuild(tree, "params", flat))
  descs = {n: pr.TensorDesc(n, "public_weights", v.dtype, v.shape, 0, v.nbytes)
           for n, v in flat.items()}
  pr.check_against(tree, "params", descs)


def test_flatten_names_and_order():
  tree = {"b": {"y": 1, "x": 2}, "a": 3, "n": None, "e": {}}
  assert list(pr.flatten(tree, "p").items()) == [("p/a", 3), ("p/b/x", 2), ("p/b/y", 1)]
  assert pr.flatten(5, "dloss") == {"dloss": 5}
  assert pr.flatten(None, "x") == {}
  assert pr.rebuild(tree, "p", {"p/a": 30, "p/b/x": 20, "p/b/y": 10}) == {
      "b": {"y": 10, "x": 20}, "a": 30, "n": None, "e": {}}
  with pytest.raises(ValueError, match="/"):
    pr.flatten({"a/b": 1}, "p")
  with pytest.raises(KeyError):
    pr.rebuild({"a": 1}, "p", {})


TEMPLATE = {"convs": {"conv0": {"kernel": jax.ShapeDtypeStruct((3, 3, 1, 8), np.float32),
                                "bias": jax.ShapeDtypeStruct((8,), np.float32)}},
            "stage": {"count": jax.ShapeDtypeStruct((), np.int32)}}


def _descs(template, prefix, cls="public_weights"):
  return {n: pr.TensorDesc(n, cls, np.dtype(v.dtype), tuple(v.shape), 0,
                           math.prod(v.shape) * np.dtype(v.dtype).itemsize)
          for n, v in pr.flatten(template, prefix).items()}


def test_check_against_accepts_exact_leaves_and_ignores_other_prefixes():
  d = _descs(TEMPLATE, "params")
  d.update(_descs({"a": jax.ShapeDtypeStruct((1,), np.float32)}, "paramsx"))
  d.update(_descs({"a": jax.ShapeDtypeStruct((1,), np.float32)}, "stats"))
  pr.check_against(TEMPLATE, "params", d)
  pr.check_against({}, "yr", {})
  pr.check_against(None, "yr", {})


def test_check_against_missing_name():
  d = _descs(TEMPLATE, "params")
  del d["params/convs/conv0/bias"]
  with pytest.raises(pr.UndeclaredTensor, match="missing"):
    pr.check_against(TEMPLATE, "params", d)


def test_check_against_extra_name():
  d = _descs(TEMPLATE, "params")
  d.update(_descs({"evil": jax.ShapeDtypeStruct((1,), np.float32)}, "params/convs"))
  with pytest.raises(pr.UndeclaredTensor, match="unexpected"):
    pr.check_against(TEMPLATE, "params", d)
  d = _descs(TEMPLATE, "params")
  d["params"] = d["params/stage/count"]  # the prefix itself as a leaf
  with pytest.raises(pr.UndeclaredTensor):
    pr.check_against(TEMPLATE, "params", d)
  with pytest.raises(pr.UndeclaredTensor):
    pr.check_against({}, "yr", _descs({"c": jax.ShapeDtypeStruct((1,), np.float32)}, "yr"))


def test_check_against_wrong_shape():
  d = _descs(TEMPLATE, "params")
  d["params/convs/conv0/kernel"] = d["params/convs/conv0/kernel"]._replace(shape=(3, 3, 8, 1))
  with pytest.raises(pr.ShapeMismatch, match="kernel"):
    pr.check_against(TEMPLATE, "params", d)
  d = _descs(TEMPLATE, "params")
  d["params/stage/count"] = d["params/stage/count"]._replace(shape=(1,))
  with pytest.raises(pr.ShapeMismatch):
    pr.check_against(TEMPLATE, "params", d)


@pytest.mark.parametrize("dtype", [np.float16, np.int32, ml_dtypes.bfloat16])
def test_check_against_wrong_dtype(dtype):
  d = _descs(TEMPLATE, "params")
  d["params/convs/conv0/bias"] = d["params/convs/conv0/bias"]._replace(dtype=np.dtype(dtype))
  with pytest.raises(pr.DtypeMismatch, match="bias"):
    pr.check_against(TEMPLATE, "params", d)


def test_encode_is_canonical_json():
  body = pr.encode(_msg(meta={"b": 1, "a": [1, 2]}, tensors=()))
  assert body[pr.HEADER.size:] == json.dumps({"a": [1, 2], "b": 1},
                                             separators=(",", ":")).encode()
