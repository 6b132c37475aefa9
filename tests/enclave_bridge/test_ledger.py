"""Tests of enclave_bridge.ledger: the boundary ledger and the README's threat model (DESIGN 2)."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest

from enclave_bridge import ledger as lg
from enclave_bridge import protocol as pr
from tests.helpers import readme



def test_every_class_is_declared_completely():
  assert lg.LEDGER
  for name, c in lg.LEDGER.items():
    assert c.name == name
    assert re.fullmatch(r"[a-z_]+", name)
    assert c.direction in {lg.TO_UNTRUSTED, lg.TO_ENCLAVE}
    for field in ("protection", "shape_rule", "when", "what"):
      assert getattr(c, field).strip(), (name, field)
    assert "|" not in c.protection + c.shape_rule + c.when  # would break the table
    assert len(name) < 256 and name.isascii()  # fits the u8 class field of a descriptor


def test_directions_of_the_known_classes():
  to_untrusted = {"activation_residual", "output_gradient", "output_gradient_residual",
                  "trusted_weight_gradient",
                  "batch_statistics", "loss", "metrics", "whole_gradient", "site_ranks"}
  to_enclave = {"public_weights", "public_batch_stats", "conv_output_residual",
                "residual_gradient", "loss_gradient"}
  assert set(lg.LEDGER) == to_untrusted | to_enclave
  for name in to_untrusted:
    assert lg.LEDGER[name].direction == lg.TO_UNTRUSTED
  for name in to_enclave:
    assert lg.LEDGER[name].direction == lg.TO_ENCLAVE


def test_check_accepts_declared_classes():
  for name, c in lg.LEDGER.items():
    assert lg.check(name, c.direction) is c


@pytest.mark.parametrize("cls", ["", "image", "label", "labels", "raw_input", "mask",
                                 "Activation_Residual", "activation_residual ", "private_u"])
def test_check_refuses_unknown_classes(cls):
  for direction in (lg.TO_UNTRUSTED, lg.TO_ENCLAVE):
    with pytest.raises(pr.UndeclaredTensor, match="not in the boundary ledger"):
      lg.check(cls, direction)


def test_check_refuses_the_wrong_direction():
  flip = {lg.TO_UNTRUSTED: lg.TO_ENCLAVE, lg.TO_ENCLAVE: lg.TO_UNTRUSTED}
  for name, c in lg.LEDGER.items():
    with pytest.raises(pr.UndeclaredTensor, match="may only cross") as e:
      lg.check(name, flip[c.direction])
    assert e.value.code == "undeclared"
    with pytest.raises(pr.UndeclaredTensor):
      lg.check(name, "sideways")


CASES = list(itertools.product(["enclave", "tee_only"], [True, False], [True, False],
                               ["none", "decompose"]))


@pytest.mark.parametrize("backend,train,bn,gp", CASES)
def test_expected_classes_are_declared(backend, train, bn, gp):
  got = lg.expected_classes(backend, train=train, batch_norm=bn, gradient_protection=gp)
  assert got and got <= set(lg.LEDGER)
  # Something goes each way: weights in, at least metrics out.
  assert {"public_weights", "metrics"} <= got
  assert ("public_batch_stats" in got) == bn
  if not train:
    assert not got & {"trusted_weight_gradient", "whole_gradient", "output_gradient",
                      "output_gradient_residual", "residual_gradient", "loss_gradient"}


@pytest.mark.parametrize("train,bn", list(itertools.product([True, False], [True, False])))
def test_expected_classes_of_the_enclave_backend(train, bn):
  none = lg.expected_classes("enclave", train=train, batch_norm=bn, gradient_protection="none")
  default = lg.expected_classes("enclave", train=train, batch_norm=bn)
  protected = lg.expected_classes("enclave", train=train, batch_norm=bn,
                                  gradient_protection="decompose")
  assert default == protected  # protection is the default (DESIGN section 2)
  assert ("output_gradient" in none) == train
  assert "output_gradient" not in protected  # no full dY ever crosses
  assert none - protected == ({"output_gradient"} if train else set())
  assert protected - none == ({"output_gradient_residual"} if train else set())
  assert {"activation_residual", "conv_output_residual", "loss"} <= none
  assert "whole_gradient" not in none
  assert ("batch_statistics" in none) == bn
  if train:
    assert {"trusted_weight_gradient", "residual_gradient", "loss_gradient"} <= none
  assert {lg.LEDGER[c].direction for c in none} == {lg.TO_UNTRUSTED, lg.TO_ENCLAVE}


@pytest.mark.parametrize("train,bn", list(itertools.product([True, False], [True, False])))
def test_expected_classes_of_tee_only(train, bn):
  got = lg.expected_classes("tee_only", train=train, batch_norm=bn)
  # Nothing derived from activations leaves the TEE-only baseline.
  assert not got & {"activation_residual", "output_gradient", "conv_output_residual",
                    "output_gradient_residual", "residual_gradient", "trusted_weight_gradient"}
  assert ("whole_gradient" in got) == train and ("loss" in got) == train
  assert ("batch_statistics" in got) == (train and bn)
  assert lg.expected_classes("tee_only", train=train, batch_norm=bn,
                             gradient_protection="none") == got


def test_traffic_counts():
  t = lg.Traffic()
  assert t.classes() == set() and t.summary() == []
  t.record("activation_residual", 100)
  t.record("activation_residual", 28)
  t.record("public_weights", 4)
  t.record("not_a_class", 1)
  assert t.count == {"activation_residual": 2, "public_weights": 1, "not_a_class": 1}
  assert t.bytes == {"activation_residual": 128, "public_weights": 4, "not_a_class": 1}
  assert t.classes() == {"activation_residual", "public_weights", "not_a_class"}
  assert t.summary() == [
      {"class": "activation_residual", "direction": lg.TO_UNTRUSTED, "tensors": 2, "bytes": 128},
      {"class": "not_a_class", "direction": "?", "tensors": 1, "bytes": 1},
      {"class": "public_weights", "direction": lg.TO_ENCLAVE, "tensors": 1, "bytes": 4}]
  table = t.table().splitlines()
  assert len(table) == 4 and "tensor class" in table[0]
  assert table[1].split()[0] == "activation_residual" and table[1].split()[-2:] == ["2", "0.00"]


def test_traffic_bytes_are_integers():
  t = lg.Traffic()
  t.record("loss", np.int64(4))
  assert t.bytes["loss"] == 4 and type(t.bytes["loss"]) is int


def test_markdown_table_lists_every_class():
  lines = lg.markdown_table().splitlines()
  assert lines[0] == "| tensor class | direction | shape | protection | when |"
  assert lines[1] == "| --- | --- | --- | --- | --- |"
  assert len(lines) == 2 + len(lg.LEDGER)
  for line, c in zip(lines[2:], lg.LEDGER.values()):
    cells = [x.strip() for x in line.strip("|").split("|")]
    assert cells == [f"`{c.name}`", c.direction, c.shape_rule, c.protection, c.when]


def test_readme_threat_model_table_is_generated_from_the_ledger():
  readme.assert_block_is_current("ledger", lg.markdown_table(), "enclave_bridge.ledger")


def test_module_prints_the_table():
  readme.assert_module_prints("enclave_bridge.ledger", lg.markdown_table())
