"""Tests of enclave_bridge.auth: the launch secret HELLO proves both ways (DESIGN 6)."""

from __future__ import annotations

import pytest

from enclave_bridge import auth
from enclave_bridge import protocol as pr


def test_secrets_are_fresh_and_256_bit():
  a, b = auth.new_secret(), auth.new_secret()
  assert a != b and len(bytes.fromhex(a)) == 32


def test_a_hello_with_the_secret_passes_and_the_reply_proves_it_back():
  secret = auth.new_secret()
  hello = auth.hello_fields(secret)
  proof = auth.check_hello(secret, hello)
  auth.check_reply(secret, hello, {"auth": proof})  # no exception


def test_each_hello_has_its_own_nonce():
  secret = auth.new_secret()
  assert auth.hello_fields(secret)["auth_nonce"] != auth.hello_fields(secret)["auth_nonce"]


@pytest.mark.parametrize("spoil", ["other_secret", "missing", "flipped", "wrong_type"])
def test_a_hello_without_the_right_proof_is_refused(spoil):
  secret = auth.new_secret()
  hello = auth.hello_fields(auth.new_secret() if spoil == "other_secret" else secret)
  if spoil == "missing":
    del hello["auth"]
  elif spoil == "flipped":
    hello["auth"] = ("0" if hello["auth"][0] != "0" else "1") + hello["auth"][1:]
  elif spoil == "wrong_type":
    hello["auth"] = 7
  with pytest.raises(pr.AuthenticationFailed, match="secret"):
    auth.check_hello(secret, hello)
  assert pr.ERRORS["auth"] is pr.AuthenticationFailed  # carried typed across the bridge


def test_a_reply_from_an_impostor_is_refused():
  secret, other = auth.new_secret(), auth.new_secret()
  hello = auth.hello_fields(secret)
  # The same nonce, proven under another launch's secret.
  forged = auth.check_hello(other, {"auth_nonce": hello["auth_nonce"],
                                    "auth": auth._mac(other, b"hello", hello["auth_nonce"])})
  # No proof, the driver's own proof echoed back, or another secret's: all refused.
  for fake in ({}, {"auth": hello["auth"]}, {"auth": forged}):
    with pytest.raises(pr.AuthenticationFailed, match="not the enclave"):
      auth.check_reply(secret, hello, fake)


def test_without_a_secret_the_check_is_off():
  assert auth.check_hello(None, {}) is None


def test_take_secret_removes_it_from_the_environment():
  secret = auth.new_secret()
  env = {auth.SECRET_ENV: secret, "OTHER": "1"}
  assert auth.take_secret(env) == secret
  assert env == {"OTHER": "1"}
  assert auth.take_secret(env) is None
  with pytest.raises(ValueError, match="hex digits"):
    auth.take_secret({auth.SECRET_ENV: "abc"})
