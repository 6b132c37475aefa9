r"""Starts and owns the enclave host process (DESIGN section 6).

The enclave host is ``python -m enclave_bridge.server`` run in one of three
modes:

* ``subprocess``: a plain child process (the stand-in used here);
* ``gramine-direct``: under Gramine without SGX (for debugging the manifest);
* ``gramine-sgx``: inside an SGX enclave.

For the Gramine modes the launcher renders
``enclave_bridge/gramine/asymml_enclave.manifest.template`` into the work
directory, runs ``gramine-manifest`` (and ``gramine-sgx-sign`` for SGX) and
then starts ``gramine-direct``/``gramine-sgx``.  Asking for Gramine where its
tools are not installed is a :class:`GramineToolMissing` error, never a silent
fallback.

The launcher owns the process: the child runs in its own process group, asks
the kernel to SIGKILL it when the launching thread dies
(``PR_SET_PDEATHSIG``), and is stopped by :meth:`EnclaveProcess.stop`, by the
context manager (also on exceptions and Ctrl-C), by an ``atexit`` hook and, in
the main thread, on SIGTERM.  No enclave outlives its driver.

Command line (mostly for debugging)::

  python -m enclave_bridge.launcher --mode=gramine-sgx --dry-run \
      [--sealed=runs/demo/mnist5k.sealed --key=runs/demo/key.bin \
       --socket=/tmp/asymml.sock --threads=1 --enclave_size=8G --workdir=DIR]

``--dry-run`` prints the rendered manifest (TOML) on stdout, preceded by the
commands that would run as TOML comments.  Without it the server is started
and the launcher waits until it exits or Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
import atexit
import collections.abc
import ctypes
import dataclasses
import importlib.util
import json
import os
import pathlib
import platform
import re
import shlex
import shutil
import signal
import stat
import subprocess
import warnings
import sys
import threading
import time
from typing import Any, Iterator, Mapping, Sequence

from enclave_bridge import auth
from enclave_bridge import transport

MODES = ("subprocess", "gramine-direct", "gramine-sgx")
TRANSPORTS = transport.TRANSPORTS

#: The Gramine tools each mode needs, in the order they run.
GRAMINE_TOOLS = {
    "gramine-direct": ("gramine-manifest", "gramine-direct"),
    "gramine-sgx": ("gramine-manifest", "gramine-sgx-sign", "gramine-sgx"),
}

#: Name of the manifest (and of the files Gramine derives from it).
MANIFEST_NAME = "asymml_enclave"
TEMPLATE_PATH = pathlib.Path(__file__).resolve().parent / "gramine" / (
    f"{MANIFEST_NAME}.manifest.template")

#: Where the Debian/Ubuntu ``gramine`` package installs ``libsysdb.so`` and
#: ``runtime/glibc``; used to make ``--dry-run`` output concrete.  A real run
#: leaves these two paths to ``gramine-manifest``.  Override with the
#: ``ASYMML_GRAMINE_PKGLIBDIR`` environment variable.
DEFAULT_GRAMINE_PKGLIBDIR = "/usr/lib/x86_64-linux-gnu/gramine"

#: File in the work directory that receives the server's stdout and stderr.
LOG_NAME = "enclave.log"
#: File in the work directory that receives gramine-manifest / -sign output.
BUILD_LOG_NAME = "gramine-build.log"

#: Inside-enclave tmpfs for scratch files (JAX, tempfile); not host-backed.
ENCLAVE_TMPDIR = "/enclave_tmp"

_SIZE_RE = re.compile(r"^([1-9][0-9]*)([KMG])$")
_SIZE_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_BARE_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_HEX_KEY_RE = re.compile(r"^[0-9a-fA-F]{32}$")
_SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux
_PR_SET_PDEATHSIG = 1
_SO_ACCEPTCON = 1 << 16  # the "listening" flag in /proc/net/unix


class LauncherError(RuntimeError):
  """The enclave host could not be prepared, started or stopped."""


class GramineToolMissing(LauncherError):
  """A Gramine mode was requested but its tools are not on ``PATH``."""


class _FrozenEnv(collections.abc.Mapping):
  """An immutable, hashable ``str -> str`` mapping (keeps EnclaveSpec frozen)."""

  __slots__ = ("_items",)

  def __init__(self, items: Mapping[str, str] | Sequence[tuple[str, str]] = ()) -> None:
    pairs = items.items() if isinstance(items, collections.abc.Mapping) else items
    self._items = dict(pairs)

  def __getitem__(self, key: str) -> str:
    return self._items[key]

  def __iter__(self) -> Iterator[str]:
    return iter(self._items)

  def __len__(self) -> int:
    return len(self._items)

  def __hash__(self) -> int:
    return hash(tuple(sorted(self._items.items())))

  def __eq__(self, other: object) -> bool:
    if isinstance(other, collections.abc.Mapping):
      return dict(self._items) == dict(other)
    return NotImplemented

  def __repr__(self) -> str:
    return f"{dict(self._items)!r}"


def _size_bytes(size: str) -> int:
  """Parses ``"8G"``/``"512M"``/``"64K"`` into bytes (ValueError otherwise)."""
  m = _SIZE_RE.match(size) if isinstance(size, str) else None
  if not m:
    raise ValueError(f"enclave_size must look like '8G', '512M' or '64K', got {size!r}")
  return int(m.group(1)) * _SIZE_UNITS[m.group(2)]


@dataclasses.dataclass(frozen=True, kw_only=True)
class EnclaveSpec:
  """Everything needed to start one enclave host.

  Attributes:
    mode: One of :data:`MODES`.
    transport: ``"unix"`` or ``"tcp"`` (127.0.0.1, an ephemeral port the
      server picks and prints).  ``None`` picks ``"unix"`` for a subprocess
      and ``"tcp"`` under Gramine, whose Unix sockets the host cannot reach.
    socket_path: Unix socket the server listens on (``transport="unix"``).
    sealed_path: The sealed (AES-GCM) data set.
    key_path: The key file.  Under Gramine it must be a Gramine encrypted
      (protected) file, e.g. written with ``gramine-sgx-pf-crypt``.
    threads: CPU threads the enclave's JAX/BLAS may use (1..256).
    enclave_size: SGX enclave size, a power of two such as ``"8G"``.
    max_threads: ``sgx.max_threads`` (JAX's thread pools plus 4 for Gramine).
    workdir: Where manifests and logs are written.
    python: The interpreter that runs the server.
    extra_env: Extra environment variables for the server (also written into
      the manifest).  Stored as an immutable mapping.
    fs_key_name: Gramine key name for the encrypted key-file mount.
    insecure_fs_key_hex: Debug only: 32 hex digits written into the manifest as
      ``fs.insecure__keys.<fs_key_name>``.  ``None`` (default) means the key
      is provisioned at run time (secret provisioning / attestation).
    sgx_debug: ``sgx.debug`` (debug enclave).  Never for production.
    signing_key: PEM key for ``gramine-sgx-sign --key``; ``None`` uses
      Gramine's default (``~/.config/gramine/enclave-key.pem``).
  """

  mode: str = "subprocess"
  transport: str | None = None
  socket_path: str = ""
  sealed_path: str
  key_path: str
  threads: int = 1
  enclave_size: str = "8G"
  max_threads: int = 64
  workdir: str
  python: str = sys.executable
  extra_env: Mapping[str, str] = dataclasses.field(default_factory=dict)
  fs_key_name: str = "asymml_key"
  insecure_fs_key_hex: str | None = None
  sgx_debug: bool = False
  signing_key: str | None = None

  def __post_init__(self) -> None:
    if self.mode not in MODES:
      raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
    self._resolve_transport()
    paths = ("sealed_path", "key_path", "workdir", "python")
    for name in paths + (("socket_path",) if self.transport == "unix" else ()):
      value = getattr(self, name)
      if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty path, got {value!r}")
      if "\0" in value:
        raise ValueError(f"{name} must not contain NUL bytes")
    if self.transport == "unix" and len(os.fsencode(os.path.abspath(self.socket_path))) > _SUN_PATH_MAX:
      raise ValueError(f"socket_path is too long for a Unix socket (max {_SUN_PATH_MAX} "
                       f"bytes): {self.socket_path!r}")
    if isinstance(self.threads, bool) or not isinstance(self.threads, int) or not (
        1 <= self.threads <= 256):
      raise ValueError(f"threads must be an integer in [1, 256], got {self.threads!r}")
    if isinstance(self.max_threads, bool) or not isinstance(self.max_threads, int) or not (
        4 <= self.max_threads <= 4096):
      raise ValueError("max_threads must be an integer in [4, 4096] (Gramine needs 4 helper "
                       f"threads), got {self.max_threads!r}")
    size = _size_bytes(self.enclave_size)
    if size & (size - 1):
      raise ValueError(f"enclave_size must be a power of two (an SGX requirement), "
                       f"got {self.enclave_size!r}")
    if not isinstance(self.extra_env, collections.abc.Mapping):
      raise ValueError(f"extra_env must be a mapping, got {type(self.extra_env).__name__}")
    for k, v in self.extra_env.items():
      if not isinstance(k, str) or not _ENV_NAME_RE.match(k):
        raise ValueError(f"extra_env has an invalid variable name: {k!r}")
      if not isinstance(v, str) or "\0" in v:
        raise ValueError(f"extra_env[{k!r}] must be a string without NUL bytes")
    object.__setattr__(self, "extra_env", _FrozenEnv(self.extra_env))
    if not isinstance(self.fs_key_name, str) or not _BARE_KEY_RE.match(self.fs_key_name):
      raise ValueError(f"fs_key_name must match [A-Za-z0-9_-]+, got {self.fs_key_name!r}")
    if self.insecure_fs_key_hex is not None and not _HEX_KEY_RE.match(
        str(self.insecure_fs_key_hex)):
      raise ValueError("insecure_fs_key_hex must be 32 hex digits (a 128-bit key)")
    if self.signing_key is not None and not str(self.signing_key).strip():
      raise ValueError("signing_key must be a non-empty path or None")

  def _resolve_transport(self) -> None:
    transport = self.transport or ("unix" if self.mode == "subprocess" else "tcp")
    if transport not in TRANSPORTS:
      raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
    if transport == "unix" and self.mode != "subprocess":
      raise ValueError(f"{self.mode} needs transport='tcp': Gramine emulates Unix sockets "
                       "inside the enclave, where the host driver cannot reach them")
    object.__setattr__(self, "transport", transport)


# ---------------------------------------------------------------------------
# The server command and its environment.


def server_argv(spec: EnclaveSpec) -> list[str]:
  """The server command line for the plain-subprocess mode.

  Args:
    spec: The enclave spec.

  Returns:
    ``[python, "-m", "enclave_bridge.server", "--socket=..." (or
    "--transport=tcp"), "--sealed=...", "--key=...", "--threads=N"]`` with the
    paths exactly as given in ``spec``.
  """
  return [spec.python, "-m", "enclave_bridge.server", *_listen_args(spec, spec.socket_path),
          f"--sealed={spec.sealed_path}", f"--key={spec.key_path}",
          f"--threads={spec.threads}"]


def _listen_args(spec: EnclaveSpec, socket_path: str) -> list[str]:
  return ["--transport=tcp"] if spec.transport == "tcp" else [f"--socket={socket_path}"]


def _thread_env(spec: EnclaveSpec) -> dict[str, str]:
  """Variables that pin JAX to the CPU and bound its thread use.

  XLA has no environment flag for the size of its intra-op pool (that is a
  compile option); ``--xla_cpu_multi_thread_eigen=false`` makes Eigen
  single-threaded when one thread is asked for.  A bare
  ``intra_op_parallelism_threads=N`` token is only harmless after a ``--``
  flag (as the first token XLA aborts, reading it as a flag-file name) and has
  no effect, so for ``threads > 1`` XLA_FLAGS is left unset.
  """
  n = str(spec.threads)
  env = {
      "JAX_PLATFORMS": "cpu",
      "OMP_NUM_THREADS": n,
      "OPENBLAS_NUM_THREADS": n,
      "MKL_NUM_THREADS": n,
      "PYTHONUNBUFFERED": "1",
  }
  if spec.threads == 1:
    env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
  return env


def _project_root() -> pathlib.Path:
  return pathlib.Path(__file__).resolve().parent.parent


def server_env(spec: EnclaveSpec) -> dict[str, str]:
  """The environment of the plain-subprocess server.

  The driver's environment, with JAX forced onto the CPU, thread counts set
  from ``spec.threads``, unbuffered output, the project root on
  ``PYTHONPATH`` and finally ``spec.extra_env``.  An inherited ``XLA_FLAGS``
  (e.g. GPU flags of the driver) is dropped.

  Args:
    spec: The enclave spec.

  Returns:
    A new dict.
  """
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env.update(_thread_env(spec))
  root = str(_project_root())
  parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
  if root not in parts:
    env["PYTHONPATH"] = os.pathsep.join([root, *parts])
  env.update(spec.extra_env)
  return env


# ---------------------------------------------------------------------------
# Manifest rendering.

_PLACEHOLDER_RE = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
_GRAMINE_BUILTINS = ("gramine.libos", "gramine.runtimedir()")


def _render_template(template: str, values: Mapping[str, str],
                     passthrough: Sequence[str] = ()) -> str:
  """Fills ``{{ name }}`` placeholders (the only Jinja subset the template uses).

  Args:
    template: Template text.
    values: Replacement text per placeholder name (inserted verbatim, not
      re-scanned).
    passthrough: Placeholder names to keep verbatim for ``gramine-manifest``.

  Returns:
    The rendered text.

  Raises:
    LauncherError: On an unknown placeholder or unsupported Jinja syntax.
  """
  for tag in ("{%", "{#"):
    if tag in template:
      raise LauncherError(f"manifest template uses unsupported Jinja syntax {tag!r}")

  def sub(m: re.Match) -> str:
    name = m.group(1)
    if name in values:
      return values[name]
    if name in passthrough:
      return m.group(0)
    raise LauncherError(f"manifest template has an unknown placeholder {{{{ {name} }}}}")

  return _PLACEHOLDER_RE.sub(sub, template)


def _toml_str(s: str) -> str:
  """A TOML basic string (JSON escapes are valid TOML; DEL must be escaped)."""
  return json.dumps(str(s), ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_key(k: str) -> str:
  return k if _BARE_KEY_RE.match(k) else _toml_str(k)


def _toml_array(items: Sequence[str], indent: str = "  ") -> str:
  """A multi-line TOML array of already-formatted values."""
  if not items:
    return "[]"
  return "[\n" + "".join(f"{indent}{item},\n" for item in items) + "]"


def _inline_table(pairs: Sequence[tuple[str, str]]) -> str:
  return "{ " + ", ".join(f"{k} = {_toml_str(v)}" for k, v in pairs) + " }"


_LAYOUT_CODE = """
import os, sys, sysconfig

def layout():
  paths = sysconfig.get_paths()
  lib = None
  if sysconfig.get_config_var("Py_ENABLE_SHARED"):
    cand = os.path.join(sysconfig.get_config_var("LIBDIR") or "",
                        sysconfig.get_config_var("LDLIBRARY") or "")
    lib = cand if os.path.isfile(cand) else None
  return {"prefix": sys.prefix, "base_prefix": sys.base_prefix,
          "stdlib": paths["stdlib"], "purelib": paths["purelib"],
          "platlib": paths["platlib"], "libpython": lib,
          "multiarch": sysconfig.get_config_var("MULTIARCH")}
"""


def _python_layout(python: str) -> dict[str, Any]:
  """Where the interpreter ``python`` keeps its stdlib, packages and libpython.

  Asks this interpreter directly when ``python`` is it, else runs ``python``.
  """
  scope: dict[str, Any] = {}
  exec(_LAYOUT_CODE, scope)  # pylint: disable=exec-used
  if os.path.abspath(python) == os.path.abspath(sys.executable):
    return scope["layout"]()
  code = _LAYOUT_CODE + "\nimport json\nprint(json.dumps(layout()))\n"
  try:
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True,
                         timeout=60)
    return json.loads(out.stdout)
  except (OSError, ValueError, subprocess.SubprocessError) as e:
    raise LauncherError(f"cannot query the interpreter {python!r}: {e}") from e


def _package_dir(name: str) -> str:
  """The directory of a top-level package of this project (not imported)."""
  spec = importlib.util.find_spec(name)
  if spec is not None and spec.submodule_search_locations:
    return os.path.realpath(list(spec.submodule_search_locations)[0])
  return str(_project_root() / name)


def _gramine_pkglibdir() -> str:
  return os.environ.get("ASYMML_GRAMINE_PKGLIBDIR", DEFAULT_GRAMINE_PKGLIBDIR).rstrip("/")


def _dedupe(items: Sequence[str]) -> list[str]:
  return list(dict.fromkeys(items))


def _identity_mounts(paths: Sequence[str]) -> list[str]:
  """``chroot`` mounts that show host ``paths`` at the same place inside.

  A path inside another listed path is dropped (the outer mount shows it).
  """
  norm = _dedupe([os.path.normpath(p) for p in paths])
  keep = [p for p in norm
          if not any(q != p and (p + "/").startswith(q.rstrip("/") + "/") for q in norm)]
  return [_inline_table([("path", p), ("uri", f"file:{p}")]) for p in keep]


def _manifest_values(spec: EnclaveSpec) -> dict[str, str]:
  """Computes the TOML value of every template placeholder."""
  py = _python_layout(spec.python)
  entrypoint = os.path.realpath(spec.python)
  argv0 = os.path.abspath(spec.python)
  socket_path = os.path.abspath(spec.socket_path)
  sealed = os.path.abspath(spec.sealed_path)
  key = os.path.abspath(spec.key_path)
  socket_dir = os.path.dirname(socket_path)
  root = str(_project_root())
  packages = [_package_dir("asymml_jax"), _package_dir("enclave_bridge")]
  multiarch = py.get("multiarch") or f"{platform.machine()}-linux-gnu"
  arch_libdirs = [f"/lib/{multiarch}", f"/usr/lib/{multiarch}"]
  site_dirs = _dedupe([py["purelib"], py["platlib"]])
  python_lib_dirs = [os.path.dirname(py["libpython"])] if py["libpython"] else []

  argv = [argv0, "-m", "enclave_bridge.server", *_listen_args(spec, socket_path),
          f"--sealed={sealed}", f"--key={key}", f"--threads={spec.threads}"]

  env = _thread_env(spec)
  env.update({
      "LD_LIBRARY_PATH": ":".join(_dedupe(["/lib", *arch_libdirs, *python_lib_dirs])),
      "PYTHONPATH": ":".join(_dedupe([root, *site_dirs])),
      "PYTHONDONTWRITEBYTECODE": "1",  # trusted files are read-only
      "TMPDIR": ENCLAVE_TMPDIR,
  })
  env.update(spec.extra_env)
  env_lines = "\n".join(f"loader.env.{_toml_key(k)} = {_toml_str(v)}"
                        for k, v in env.items())
  # The one host value the enclave takes: this launch's secret, checked in HELLO.
  env_lines += f"\nloader.env.{auth.SECRET_ENV} = {{ passthrough = true }}"

  host_dirs = [*arch_libdirs, py["base_prefix"], py["prefix"],
               os.path.dirname(entrypoint), *packages, sealed]
  if spec.transport == "unix":
    host_dirs.append(socket_dir)
  mounts = [_inline_table([("path", "/lib"), ("uri", "file:{{ gramine.runtimedir() }}")])]
  mounts += _identity_mounts(host_dirs)
  mounts += [
      _inline_table([("type", "tmpfs"), ("path", ENCLAVE_TMPDIR)]),
      _inline_table([("type", "encrypted"), ("path", key), ("uri", f"file:{key}"),
                     ("key_name", spec.fs_key_name)]),
      _inline_table([("type", "untrusted_shm"), ("path", "/dev/shm"),
                     ("uri", "dev:/dev/shm")]),
  ]

  trusted = ["file:{{ gramine.libos }}", "file:{{ gramine.runtimedir() }}/",
             f"file:{entrypoint}"]
  if py["libpython"]:
    trusted.append(f"file:{os.path.realpath(py['libpython'])}")
  trusted += [f"file:{d.rstrip('/')}/" for d in arch_libdirs]
  trusted += [f"file:{py['stdlib'].rstrip('/')}/"]
  pyvenv_cfg = os.path.join(py["prefix"], "pyvenv.cfg")
  if py["prefix"] != py["base_prefix"] and os.path.isfile(pyvenv_cfg):
    trusted.append(f"file:{pyvenv_cfg}")  # read at start-up to find the venv
  trusted += [f"file:{d.rstrip('/')}/" for d in site_dirs]
  trusted += [f"file:{d.rstrip('/')}/" for d in packages]
  trusted += [f"file:{sealed}"]

  # The bridge's shared-memory arena (names are chosen per run).
  allowed = ["dev:/dev/shm/"]
  if spec.transport == "unix":
    allowed.insert(0, f"file:{socket_path}")

  keys = ""
  if spec.insecure_fs_key_hex is not None:
    keys = ("\n# DEBUG ONLY: a hard-coded key is visible to anyone holding the manifest.\n"
            f"fs.insecure__keys.{spec.fs_key_name} = {_toml_str(spec.insecure_fs_key_hex)}\n")

  values = {
      "entrypoint": _toml_str(entrypoint),
      "log_level": _toml_str("error"),
      "argv": _toml_array([_toml_str(a) for a in argv]),
      "env": env_lines,
      "mounts": _toml_array(mounts),
      "stack_size": _toml_str("2M"),
      "sgx_debug": "true" if spec.sgx_debug else "false",
      "enclave_size": _toml_str(spec.enclave_size),
      "max_threads": str(spec.max_threads),
      "trusted_files": _toml_array([_toml_str(t) for t in _dedupe(trusted)]),
      "allowed_files": _toml_array([_toml_str(a) for a in allowed]),
      "insecure_keys": keys,
  }
  for name, text in values.items():
    stripped = text.replace("{{ gramine.runtimedir() }}", "").replace(
        "{{ gramine.libos }}", "")
    if any(tag in stripped for tag in ("{{", "{%", "{#", "}}")):
      raise LauncherError(f"a value for {name} contains Jinja delimiters; gramine-manifest "
                          "would misread it (rename the offending path)")
  return values


def render_manifest(spec: EnclaveSpec, *, resolve_gramine: bool = True) -> str:
  """Renders the Gramine manifest for ``spec``.

  Args:
    spec: The enclave spec (any mode).
    resolve_gramine: If true (the default, used by ``--dry-run``), also
      replace ``{{ gramine.libos }}`` and ``{{ gramine.runtimedir() }}`` with
      paths under :data:`DEFAULT_GRAMINE_PKGLIBDIR` so the result is concrete
      TOML.  If false, keep them for ``gramine-manifest`` to fill (what the
      launcher writes to the work directory); the result is TOML as well.

  Returns:
    The manifest text.

  Raises:
    LauncherError: If the template cannot be rendered.
  """
  template = TEMPLATE_PATH.read_text()
  text = _render_template(template, _manifest_values(spec), passthrough=_GRAMINE_BUILTINS)
  if resolve_gramine:
    libdir = _gramine_pkglibdir()
    text = _render_template(text, {"gramine.libos": f"{libdir}/libsysdb.so",
                                   "gramine.runtimedir()": f"{libdir}/runtime/glibc"})
  return text


def gramine_commands(spec: EnclaveSpec, manifest_path: str) -> list[list[str]]:
  """The Gramine commands the launcher runs, in order (all from ``workdir``).

  Args:
    spec: An enclave spec in a Gramine mode.
    manifest_path: The manifest to produce, ``<dir>/<name>.manifest``; its
      template ``<dir>/<name>.manifest.template`` is what
      :func:`render_manifest` (with ``resolve_gramine=False``) wrote.

  Returns:
    ``gramine-manifest`` (template to manifest), then for SGX
    ``gramine-sgx-sign`` (manifest to ``.manifest.sgx`` and ``.sig``), then the
    launch, ``gramine-direct <name>`` or ``gramine-sgx <name>``.  The launch is
    always the last command.

  Raises:
    ValueError: For ``subprocess`` mode or a path not ending in ``.manifest``.
  """
  if spec.mode not in GRAMINE_TOOLS:
    raise ValueError(f"gramine_commands needs a Gramine mode, got {spec.mode!r}")
  if not manifest_path.endswith(".manifest"):
    raise ValueError(f"manifest_path must end with '.manifest', got {manifest_path!r}")
  name = os.path.basename(manifest_path)[:-len(".manifest")]
  cmds = [["gramine-manifest", f"{manifest_path}.template", manifest_path]]
  if spec.mode == "gramine-sgx":
    sign = ["gramine-sgx-sign", "--manifest", manifest_path, "--output",
            f"{manifest_path}.sgx"]
    if spec.signing_key:
      sign += ["--key", os.path.abspath(spec.signing_key)]
    cmds.append(sign)
    cmds.append(["gramine-sgx", name])
  else:
    cmds.append(["gramine-direct", name])
  return cmds


def check_gramine_tools(mode: str) -> None:
  """Raises :class:`GramineToolMissing` unless every tool ``mode`` needs is on PATH."""
  tools = GRAMINE_TOOLS.get(mode, ())
  missing = [t for t in tools if shutil.which(t) is None]
  if missing:
    raise GramineToolMissing(f"{mode} mode needs {', '.join(tools)} on PATH; "
                             f"not found: {', '.join(missing)}")


# ---------------------------------------------------------------------------
# Process ownership.

_LIVE: set["EnclaveProcess"] = set()
_LIVE_LOCK = threading.Lock()
_SIGTERM_INSTALLED = False
_LIBC: Any = None


def _libc() -> Any:
  global _LIBC
  if _LIBC is None:
    _LIBC = ctypes.CDLL(None, use_errno=True)
  return _LIBC


def _make_preexec(parent_pid: int):
  """The child-side setup: SIGKILL me when my parent (thread) dies."""
  prctl = _libc().prctl  # resolved before fork

  def preexec() -> None:
    prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
      os.kill(os.getpid(), signal.SIGKILL)

  return preexec


def _stop_all() -> None:
  with _LIVE_LOCK:
    procs = list(_LIVE)
  for p in procs:
    try:
      p.stop(timeout=2.0)
    except Exception:  # pylint: disable=broad-except
      pass


def _on_sigterm(signum: int, frame: Any) -> None:
  del frame
  # Unwinds through `with EnclaveProcess(...)` blocks; atexit then stops the rest.
  raise SystemExit(128 + signum)


def _install_sigterm_handler() -> None:
  """Turns SIGTERM into SystemExit (main thread, default handler only)."""
  global _SIGTERM_INSTALLED
  if _SIGTERM_INSTALLED or threading.current_thread() is not threading.main_thread():
    return
  if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
    signal.signal(signal.SIGTERM, _on_sigterm)
    _SIGTERM_INSTALLED = True


def _restore_sigterm_handler() -> None:
  global _SIGTERM_INSTALLED
  if not _SIGTERM_INSTALLED or threading.current_thread() is not threading.main_thread():
    return
  if signal.getsignal(signal.SIGTERM) is _on_sigterm:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
  _SIGTERM_INSTALLED = False


atexit.register(_stop_all)


def _is_socket(path: str) -> bool:
  try:
    return stat.S_ISSOCK(os.stat(path).st_mode)
  except OSError:
    return False


def _socket_listening(*paths: str) -> bool:
  """Whether some process listens on a Unix socket bound to one of ``paths``.

  Reads ``/proc/net/unix`` instead of connecting: the server accepts a single
  connection, so a probe would use it up.  A socket shows there under the
  path it was bound with, hence the relative spelling may be passed too.
  """
  names = set(paths)
  try:
    with open("/proc/net/unix") as f:
      next(f)
      for line in f:
        parts = line.split()
        if len(parts) >= 8 and " ".join(parts[7:]) in names and (
            int(parts[3], 16) & _SO_ACCEPTCON):
          return True
  except (OSError, ValueError, StopIteration):
    return False
  return False


def _tail(path: pathlib.Path, n: int) -> str:
  try:
    with open(path, "rb") as f:
      f.seek(0, os.SEEK_END)
      size = f.tell()
      f.seek(max(0, size - 256 * 1024))
      data = f.read()
  except OSError:
    return ""
  lines = data.decode("utf-8", errors="replace").splitlines()
  return "\n".join(lines[-n:]) if n > 0 else ""


class EnclaveProcess:
  """Owns one enclave host process.

  Use as ``with EnclaveProcess(spec).start() as enclave: ...``.  The child
  runs in its own process group with ``PR_SET_PDEATHSIG=SIGKILL``; note that
  Linux delivers that signal when the *thread* that started the child exits,
  so start long-lived enclaves from a thread that outlives them (e.g. the main
  thread).

  Readiness is the server's socket file appearing (``transport="unix"``) or,
  for TCP, its ready line naming the loopback port it bound.  Every start
  draws a fresh launch secret (:attr:`secret`, ``auth.py``) that the server
  receives in its environment and HELLO must prove.

  Args:
    spec: What to start.
    _argv_override: Testing hook: run this command instead of the server
      (``subprocess`` mode only), with the same environment and ownership.
  """

  def __init__(self, spec: EnclaveSpec, *, _argv_override: Sequence[str] | None = None
               ) -> None:
    if _argv_override is not None and spec.mode != "subprocess":
      raise ValueError("_argv_override is only supported in subprocess mode")
    self.spec = spec
    self._argv_override = list(_argv_override) if _argv_override is not None else None
    self._proc: subprocess.Popen | None = None
    self._pgid: int | None = None
    self._lock = threading.RLock()
    self.secret = ""  # this launch's secret (drawn by start())
    self.address = ""  # where the server listens: a Unix path or tcp://127.0.0.1:PORT

  # -- properties -----------------------------------------------------------

  @property
  def pid(self) -> int | None:
    """The child's pid (the Gramine loader in Gramine modes), or None."""
    return self._proc.pid if self._proc is not None else None

  @property
  def returncode(self) -> int | None:
    """The child's exit status once it has exited (negative: killed by signal)."""
    if self._proc is None:
      return None
    return self._proc.poll()

  @property
  def log_path(self) -> pathlib.Path:
    """The file that receives the server's stdout and stderr."""
    return pathlib.Path(self.spec.workdir) / LOG_NAME

  def alive(self) -> bool:
    """Whether the child has been started and has not exited."""
    return self._proc is not None and self._proc.poll() is None

  def wait(self, timeout: float | None = None) -> int:
    """Waits for the child to exit and returns its exit status.

    Raises:
      LauncherError: If it was never started.
      subprocess.TimeoutExpired: If ``timeout`` passes first.
    """
    if self._proc is None:
      raise LauncherError("enclave was never started")
    return self._proc.wait(timeout=timeout)

  def stderr_tail(self, n: int = 40) -> str:
    """The last ``n`` lines the server wrote (stdout and stderr share the log)."""
    return _tail(self.log_path, n)

  # -- lifecycle ------------------------------------------------------------

  def start(self, timeout: float = 60.0) -> "EnclaveProcess":
    """Launches the server and waits until its socket exists.

    For Gramine modes the tools are checked first (before anything is
    written), then the manifest is rendered into ``workdir``, built (and
    signed) and launched.  ``timeout`` bounds only the wait for the socket.

    Args:
      timeout: Seconds to wait for the socket after launch.

    Returns:
      self.

    Raises:
      GramineToolMissing: A Gramine tool is not on PATH.
      LauncherError: Building failed, the socket path is in use, the server
        exited early or did not create its socket in time (with the tail of
        its log).
    """
    spec = self.spec
    if spec.mode in GRAMINE_TOOLS:
      check_gramine_tools(spec.mode)
    with self._lock:
      if self.alive():
        raise LauncherError(f"enclave already running (pid {self.pid})")
      workdir = pathlib.Path(spec.workdir)
      workdir.mkdir(parents=True, exist_ok=True)
      if spec.transport == "unix":
        self._prepare_socket_path()
      if spec.mode == "subprocess":
        argv = self._argv_override or server_argv(spec)
        env = server_env(spec)
        cwd = None
      else:
        argv = self._build_gramine(workdir)
        env = dict(os.environ)
        cwd = str(workdir)
      self.secret, self.address = auth.new_secret(), ""
      self._launch(argv, {**env, auth.SECRET_ENV: self.secret}, cwd)
    try:
      self._wait_ready(timeout)
    except BaseException:  # includes KeyboardInterrupt while waiting
      self.stop()
      raise
    return self

  def _prepare_socket_path(self) -> None:
    path = os.path.abspath(self.spec.socket_path)
    if os.path.lexists(path):
      if not _is_socket(path):
        raise LauncherError(f"socket path {path} exists and is not a socket")
      if _socket_listening(path, self.spec.socket_path):
        raise LauncherError(f"socket {path} is in use by another process (another enclave?)")
      os.unlink(path)  # stale, from a server that was killed
    os.makedirs(os.path.dirname(path), exist_ok=True)

  def _build_gramine(self, workdir: pathlib.Path) -> list[str]:
    manifest = str((workdir / f"{MANIFEST_NAME}.manifest").resolve())
    pathlib.Path(f"{manifest}.template").write_text(
        render_manifest(self.spec, resolve_gramine=False))
    cmds = gramine_commands(self.spec, manifest)
    build_log = workdir / BUILD_LOG_NAME
    with open(build_log, "w") as log:
      for cmd in cmds[:-1]:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        try:
          res = subprocess.run(cmd, cwd=workdir, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, check=False)
        except OSError as e:
          raise LauncherError(f"cannot run {cmd[0]}: {e}") from e
        log.write(res.stdout)
        log.flush()
        if res.returncode != 0:
          tail = "\n".join(res.stdout.splitlines()[-20:])
          raise LauncherError(f"{cmd[0]} failed with exit code {res.returncode} "
                              f"(full output in {build_log}):\n{tail}")
    return cmds[-1]

  def _launch(self, argv: list[str], env: Mapping[str, str], cwd: str | None) -> None:
    with open(self.log_path, "wb") as log, warnings.catch_warnings():
      # The fork before exec runs only prctl (no locks, no JAX), so JAX's
      # "fork in a multithreaded process" warning does not apply here.
      warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called")
      try:
        self._proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=dict(env), cwd=cwd, process_group=0,
            preexec_fn=_make_preexec(os.getpid()), close_fds=True)
      except OSError as e:
        raise LauncherError(f"cannot start {argv[0]}: {e}") from e
    self._pgid = self._proc.pid  # process_group=0: the child leads its group
    with _LIVE_LOCK:
      _LIVE.add(self)
    _install_sigterm_handler()

  def _ready_address(self) -> str:
    """The server's address once it listens, else ``""``."""
    if self.spec.transport == "unix":
      path = os.path.abspath(self.spec.socket_path)
      return path if _is_socket(path) else ""
    for line in _tail(self.log_path, 200).splitlines():
      if line.startswith(transport.READY_PREFIX):
        address = line[len(transport.READY_PREFIX):].split(" ", 1)[0]
        transport.tcp_port(address)  # refuses anything but 127.0.0.1
        return address
    return ""

  def _wait_ready(self, timeout: float) -> None:
    what = (f"its socket {os.path.abspath(self.spec.socket_path)}"
            if self.spec.transport == "unix" else "its TCP loopback port")
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
      rc = self._proc.poll() if self._proc is not None else None
      if rc is not None:
        self.stop()
        raise LauncherError(
            f"enclave server exited with code {rc} before opening {what}; "
            f"last lines of {self.log_path}:\n{self.stderr_tail()}")
      self.address = self._ready_address()
      if self.address:
        return
      if time.monotonic() >= deadline:
        tail = self.stderr_tail()
        self.stop()
        raise LauncherError(
            f"enclave server did not open {what} within {timeout:g} s; "
            f"last lines of {self.log_path}:\n{tail}")
      time.sleep(delay)
      delay = min(delay * 2, 0.05)

  def stop(self, timeout: float = 5.0) -> None:
    """Stops the server: SIGTERM to its group, wait, then SIGKILL.

    Idempotent; also removes the socket file.

    Args:
      timeout: Seconds to wait after SIGTERM before SIGKILL.
    """
    with self._lock:
      proc, pgid = self._proc, self._pgid
      if proc is not None:
        if proc.poll() is None:
          self._signal_group(pgid, signal.SIGTERM)
          self._signal_group(pgid, signal.SIGCONT)  # a stopped enclave must see it
          try:
            proc.wait(timeout=timeout)
          except subprocess.TimeoutExpired:
            self._signal_group(pgid, signal.SIGKILL)
            proc.wait()
        self._signal_group(pgid, signal.SIGKILL)  # stragglers in the group
      with _LIVE_LOCK:
        _LIVE.discard(self)
        last = not _LIVE
      if last:
        _restore_sigterm_handler()
      path = os.path.abspath(self.spec.socket_path or ".")
      if proc is not None and _is_socket(path) and not _socket_listening(
          path, self.spec.socket_path):
        try:
          os.unlink(path)
        except OSError:
          pass

  @staticmethod
  def _signal_group(pgid: int | None, sig: int) -> None:
    if pgid is None:
      return
    try:
      os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
      pass

  def __enter__(self) -> "EnclaveProcess":
    if self._proc is None:
      self.start()
    return self

  def __exit__(self, *exc: object) -> None:
    self.stop()

  def __repr__(self) -> str:
    state = "running" if self.alive() else f"exited {self.returncode}" if self._proc else "new"
    return f"EnclaveProcess(mode={self.spec.mode}, pid={self.pid}, {state})"


# ---------------------------------------------------------------------------
# Command line.


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      prog="python -m enclave_bridge.launcher",
      description="Start the AsymML enclave host, or print its Gramine manifest.")
  p.add_argument("--mode", choices=MODES, default="subprocess")
  p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                 help="print the manifest (Gramine modes) and commands; start nothing")
  p.add_argument("--sealed", default="runs/demo/mnist5k.sealed")
  p.add_argument("--key", default="runs/demo/key.bin")
  p.add_argument("--transport", choices=TRANSPORTS, default=None,
                 help="unix (subprocess default) or tcp (127.0.0.1; the Gramine default)")
  p.add_argument("--socket", default="/tmp/asymml.sock", help="the Unix socket's path")
  p.add_argument("--threads", type=int, default=1)
  p.add_argument("--enclave_size", default="8G")
  p.add_argument("--max_threads", type=int, default=64)
  p.add_argument("--workdir", default="runs/enclave")
  p.add_argument("--python", default=sys.executable)
  p.add_argument("--fs_key_name", default="asymml_key")
  p.add_argument("--insecure_fs_key", default=None,
                 help="DEBUG ONLY: 32 hex digits for fs.insecure__keys")
  p.add_argument("--sgx_debug", action="store_true")
  p.add_argument("--signing_key", default=None)
  p.add_argument("--timeout", type=float, default=60.0,
                 help="seconds to wait for the server's socket")
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of ``python -m enclave_bridge.launcher``."""
  args = _parse_args(argv)
  try:
    spec = EnclaveSpec(mode=args.mode, transport=args.transport, socket_path=args.socket,
                       sealed_path=args.sealed,
                       key_path=args.key, threads=args.threads,
                       enclave_size=args.enclave_size, max_threads=args.max_threads,
                       workdir=args.workdir, python=args.python,
                       fs_key_name=args.fs_key_name,
                       insecure_fs_key_hex=args.insecure_fs_key, sgx_debug=args.sgx_debug,
                       signing_key=args.signing_key)
    if args.dry_run:
      return _dry_run(spec)
    proc = EnclaveProcess(spec)
    with proc.start(timeout=args.timeout):
      print(f"enclave: {spec.mode} server pid {proc.pid} listening on "
            f"{proc.address} (log: {proc.log_path}); Ctrl-C stops it",
            file=sys.stderr, flush=True)
      rc = proc.wait()
    if rc != 0:
      print(f"enclave: server exited with code {rc}; last lines of {proc.log_path}:\n"
            f"{proc.stderr_tail()}", file=sys.stderr)
    return rc if rc >= 0 else 128 - rc
  except KeyboardInterrupt:
    print("enclave: stopped", file=sys.stderr)
    return 130
  except (LauncherError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1


def _dry_run(spec: EnclaveSpec) -> int:
  out = sys.stdout
  if spec.mode == "subprocess":
    out.write("# subprocess mode: no manifest.  Would run:\n")
    out.write(f"#   {shlex.join(server_argv(spec))}\n")
    for k, v in _thread_env(spec).items():
      out.write(f"#   with {k}={v}\n")
    return 0
  manifest = str(pathlib.Path(spec.workdir).resolve() / f"{MANIFEST_NAME}.manifest")
  out.write(f"# {spec.mode}: the launcher would write {manifest}.template, then run"
            " (in the work directory):\n")
  for cmd in gramine_commands(spec, manifest):
    out.write(f"#   {shlex.join(cmd)}\n")
  out.write(f"# transport: {spec.transport} (the server binds 127.0.0.1 on an ephemeral port "
            f"and prints it; HELLO proves the launch secret in {auth.SECRET_ENV})\n"
            if spec.transport == "tcp" else f"# transport: unix ({spec.socket_path})\n")
  out.write(f"# Gramine built-ins below resolved against {_gramine_pkglibdir()}.\n\n")
  out.write(render_manifest(spec, resolve_gramine=True))
  out.flush()
  return 0


if __name__ == "__main__":
  sys.exit(main())
