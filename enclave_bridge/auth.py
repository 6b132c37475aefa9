"""The per-launch secret that binds the driver and its enclave (DESIGN section 6).

The launcher draws a fresh 256-bit secret for every enclave it starts and
hands it to the server in its environment (``SECRET_ENV``; under Gramine a
``passthrough`` variable, the only value the host gives the enclave).  HELLO
then proves, both ways, that each end holds it:

* the driver sends a fresh nonce and ``HMAC(secret, "hello" || nonce)``; the
  server refuses a HELLO without the right proof and waits for the next
  connection, so no other local process can drive the enclave;
* the server answers with ``HMAC(secret, "reply" || nonce)``; the driver
  refuses a reply without it, so no other local process can pose as the
  enclave (e.g. on a TCP loopback port).

The secret itself never crosses the socket.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from typing import Mapping

from enclave_bridge import protocol as pr

#: Environment variable that carries the secret (hex) to the server.
SECRET_ENV = "ASYMML_BRIDGE_SECRET"
_SECRET_BYTES = 32


AuthenticationFailed = pr.AuthenticationFailed


def new_secret() -> str:
  """A fresh per-launch secret (64 hex digits)."""
  return secrets.token_hex(_SECRET_BYTES)


def take_secret(environ: dict | None = None) -> str | None:
  """Reads and removes ``SECRET_ENV`` (so no child process inherits it)."""
  env = os.environ if environ is None else environ
  value = env.pop(SECRET_ENV, None)
  if value is None:
    return None
  try:
    if len(bytes.fromhex(value)) != _SECRET_BYTES:
      raise ValueError
  except ValueError:
    raise ValueError(f"{SECRET_ENV} must be {2 * _SECRET_BYTES} hex digits") from None
  return value


def _mac(secret: str, label: bytes, nonce: str) -> str:
  return hmac.new(bytes.fromhex(secret), label + nonce.encode(), hashlib.sha256).hexdigest()


def hello_fields(secret: str) -> dict[str, str]:
  """The HELLO metadata that proves the driver holds ``secret``."""
  nonce = secrets.token_hex(16)
  return {"auth_nonce": nonce, "auth": _mac(secret, b"hello", nonce)}


def check_hello(secret: str | None, meta: Mapping) -> str | None:
  """Checks a HELLO's proof; returns the reply's proof (``None`` without a secret).

  Raises:
    AuthenticationFailed: the proof is missing or wrong.
  """
  if secret is None:
    return None
  nonce, proof = meta.get("auth_nonce"), meta.get("auth")
  if not isinstance(nonce, str) or not isinstance(proof, str) or not hmac.compare_digest(
      proof, _mac(secret, b"hello", nonce)):
    raise AuthenticationFailed("HELLO does not carry this launch's secret: only the driver "
                               "that started the enclave may talk to it")
  return _mac(secret, b"reply", nonce)


def check_reply(secret: str, hello: Mapping, reply: Mapping) -> None:
  """Checks that the HELLO reply came from the enclave holding ``secret``.

  Raises:
    AuthenticationFailed: the reply's proof is missing or wrong.
  """
  proof = reply.get("auth")
  want = _mac(secret, b"reply", str(hello["auth_nonce"]))
  if not isinstance(proof, str) or not hmac.compare_digest(proof, want):
    raise AuthenticationFailed("the process on the bridge socket is not the enclave this "
                               "driver started (its HELLO reply lacks the launch secret)")
