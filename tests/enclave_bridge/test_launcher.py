"""The enclave launcher: spec checks, manifest, Gramine commands, process ownership."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import tomllib

import pytest

from enclave_bridge import auth
from enclave_bridge import fault_table
from enclave_bridge import launcher
from enclave_bridge import transport
from enclave_bridge.launcher import (EnclaveProcess, EnclaveSpec, GramineToolMissing,
                                     LauncherError)

ROOT = pathlib.Path(__file__).resolve().parents[2]

# A stand-in server: bind the Unix socket given as argv[1] (after an optional
# delay in argv[2]) and sleep.
STAND_IN = textwrap.dedent("""
  import socket, sys, time
  time.sleep(float(sys.argv[2]) if len(sys.argv) > 2 else 0.0)
  s = socket.socket(socket.AF_UNIX)
  s.bind(sys.argv[1])
  s.listen()
  print("stand-in ready", flush=True)
  time.sleep(600)
""")


@pytest.fixture
def sock_dir():
  # Short path: tmp_path can exceed the 107-byte sun_path limit.
  d = tempfile.mkdtemp(prefix="asl", dir="/tmp")
  yield pathlib.Path(d)
  shutil.rmtree(d, ignore_errors=True)


def _spec(tmp_path: pathlib.Path, sock_dir: pathlib.Path, **kw) -> EnclaveSpec:
  args = dict(socket_path=str(sock_dir / "e.sock"), sealed_path=str(tmp_path / "d.sealed"),
              key_path=str(tmp_path / "key.bin"), workdir=str(tmp_path / "work"))
  args.update(kw)
  return EnclaveSpec(**args)


def _stand_in_argv(spec: EnclaveSpec, delay: float = 0.0) -> list[str]:
  return [sys.executable, "-c", STAND_IN, spec.socket_path, str(delay)]


def _gone(pid: int, within: float = 5.0) -> bool:
  """True once ``pid`` no longer exists or is a zombie (nobody may reap it)."""
  deadline = time.monotonic() + within
  while time.monotonic() < deadline:
    try:
      with open(f"/proc/{pid}/stat") as f:
        state = f.read().rsplit(")", 1)[1].split()[0]
      if state in ("Z", "X"):
        return True
    except (FileNotFoundError, ProcessLookupError):
      return True
    time.sleep(0.05)
  return False


# ---------------------------------------------------------------------------
# EnclaveSpec.


@pytest.mark.parametrize("bad, match", [
    (dict(mode="sgx"), "mode must be one of"),
    (dict(threads=0), "threads"),
    (dict(threads=257), "threads"),
    (dict(threads=True), "threads"),
    (dict(threads=2.0), "threads"),
    (dict(max_threads=2), "max_threads"),
    (dict(enclave_size="8GB"), "enclave_size"),
    (dict(enclave_size="0G"), "enclave_size"),
    (dict(enclave_size="3G"), "power of two"),
    (dict(enclave_size=""), "enclave_size"),
    (dict(socket_path=""), "socket_path"),
    (dict(sealed_path="  "), "sealed_path"),
    (dict(key_path=""), "key_path"),
    (dict(workdir=""), "workdir"),
    (dict(python=""), "python"),
    (dict(socket_path="/tmp/" + "s" * 120), "too long"),
    (dict(extra_env={"A=B": "1"}), "invalid variable name"),
    (dict(extra_env={"A": 1}), "extra_env"),
    (dict(fs_key_name="a b"), "fs_key_name"),
    (dict(insecure_fs_key_hex="abc"), "32 hex"),
])
def test_spec_rejects_bad_values(tmp_path, sock_dir, bad, match):
  with pytest.raises(ValueError, match=match):
    _spec(tmp_path, sock_dir, **bad)


def test_spec_accepts_valid_values_and_is_frozen_and_hashable(tmp_path, sock_dir):
  for size in ("4G", "512M", "64K", "8G"):
    _spec(tmp_path, sock_dir, enclave_size=size)
  for mode in launcher.MODES:
    _spec(tmp_path, sock_dir, mode=mode, threads=256)
  env = {"FOO": "bar"}
  spec = _spec(tmp_path, sock_dir, extra_env=env)
  env["FOO"] = "changed"  # the spec keeps its own copy
  assert dict(spec.extra_env) == {"FOO": "bar"}
  with pytest.raises(TypeError):
    spec.extra_env["FOO"] = "x"  # type: ignore[index]
  with pytest.raises(dataclasses.FrozenInstanceError):
    spec.threads = 2  # type: ignore[misc]
  assert hash(spec) == hash(_spec(tmp_path, sock_dir, extra_env={"FOO": "bar"}))
  assert spec == dataclasses.replace(spec)
  assert spec.mode == "subprocess" and spec.threads == 1 and spec.enclave_size == "8G"
  assert spec.python == sys.executable


# ---------------------------------------------------------------------------
# Server command and environment.


def test_server_argv(tmp_path, sock_dir):
  spec = _spec(tmp_path, sock_dir, threads=3)
  assert launcher.server_argv(spec) == [
      sys.executable, "-m", "enclave_bridge.server", f"--socket={sock_dir}/e.sock",
      f"--sealed={tmp_path}/d.sealed", f"--key={tmp_path}/key.bin", "--threads=3"]


def test_server_env_single_thread(tmp_path, sock_dir, monkeypatch):
  monkeypatch.setenv("ASYMML_TEST_INHERITED", "yes")
  monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_autotune_level=0")
  monkeypatch.setenv("JAX_PLATFORMS", "cuda")
  env = launcher.server_env(_spec(tmp_path, sock_dir, extra_env={"EXTRA": "1"}))
  assert env["ASYMML_TEST_INHERITED"] == "yes"
  assert env["JAX_PLATFORMS"] == "cpu"
  assert env["XLA_FLAGS"].startswith("--xla_cpu_multi_thread_eigen=false")
  assert "intra_op_parallelism_threads=1" in env["XLA_FLAGS"]
  assert "xla_gpu" not in env["XLA_FLAGS"]
  for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    assert env[var] == "1"
  assert env["PYTHONUNBUFFERED"] == "1"
  assert env["EXTRA"] == "1"
  assert str(ROOT) in env["PYTHONPATH"].split(os.pathsep)


def test_server_env_many_threads_and_extra_env_wins(tmp_path, sock_dir, monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  env = launcher.server_env(_spec(tmp_path, sock_dir, threads=4,
                                  extra_env={"OMP_NUM_THREADS": "2"}))
  assert env["OPENBLAS_NUM_THREADS"] == "4" and env["MKL_NUM_THREADS"] == "4"
  assert env["OMP_NUM_THREADS"] == "2"
  # No XLA flag bounds the pool; a bare first token would abort XLA.
  assert "XLA_FLAGS" not in env


# ---------------------------------------------------------------------------
# Manifest.


def _manifest(spec: EnclaveSpec, **kw) -> dict:
  text = launcher.render_manifest(spec, **kw)
  return tomllib.loads(text)


def test_render_manifest_is_toml_with_everything_pinned(tmp_path, sock_dir):
  spec = _spec(tmp_path, sock_dir, mode="gramine-sgx", threads=2, enclave_size="4G",
               max_threads=32, extra_env={"ASYMML_X": "1"})
  text = launcher.render_manifest(spec)
  assert "{{" not in text and "}}" not in text
  m = tomllib.loads(text)
  python = os.path.realpath(sys.executable)
  assert m["libos"]["entrypoint"] == python
  libdir = launcher.DEFAULT_GRAMINE_PKGLIBDIR
  assert m["loader"]["entrypoint"]["uri"] == f"file:{libdir}/libsysdb.so"
  assert m["loader"]["argv"] == [
      os.path.abspath(sys.executable), "-m", "enclave_bridge.server",
      "--transport=tcp", f"--sealed={tmp_path}/d.sealed",
      f"--key={tmp_path}/key.bin", "--threads=2"]  # Gramine's default: TCP loopback
  env = m["loader"]["env"]
  # The one host value: this launch's secret (nothing else passes through).
  assert env[auth.SECRET_ENV] == {"passthrough": True}
  assert [k for k, v in env.items() if isinstance(v, dict)] == [auth.SECRET_ENV]
  assert env["JAX_PLATFORMS"] == "cpu" and env["OMP_NUM_THREADS"] == "2"
  assert env["PYTHONUNBUFFERED"] == "1" and env["ASYMML_X"] == "1"
  assert str(ROOT) in env["PYTHONPATH"].split(":")
  assert m["sgx"]["enclave_size"] == "4G"
  assert m["sgx"]["max_threads"] == 32
  assert m["sgx"]["debug"] is False

  trusted = m["sgx"]["trusted_files"]
  assert f"file:{python}" in trusted
  assert f"file:{libdir}/libsysdb.so" in trusted
  assert f"file:{libdir}/runtime/glibc/" in trusted
  assert f"file:{ROOT}/asymml_jax/" in trusted
  assert f"file:{ROOT}/enclave_bridge/" in trusted
  import sysconfig
  assert f"file:{sysconfig.get_paths()['stdlib']}/" in trusted
  assert f"file:{sysconfig.get_paths()['purelib']}/" in trusted
  assert f"file:{tmp_path}/d.sealed" in trusted  # the data set is measured

  mounts = m["fs"]["mounts"]
  by_path = {mt["path"]: mt for mt in mounts}
  assert by_path["/lib"]["uri"] == f"file:{libdir}/runtime/glibc"
  assert by_path[f"{tmp_path}/d.sealed"] == {"path": f"{tmp_path}/d.sealed",
                                              "uri": f"file:{tmp_path}/d.sealed"}
  key = by_path[f"{tmp_path}/key.bin"]
  assert key["type"] == "encrypted" and key["uri"] == f"file:{tmp_path}/key.bin"
  assert key["key_name"] == "asymml_key"
  assert by_path["/dev/shm"] == {"type": "untrusted_shm", "path": "/dev/shm",
                                 "uri": "dev:/dev/shm"}
  assert str(sock_dir) not in by_path  # no Unix socket under TCP
  assert by_path[launcher.ENCLAVE_TMPDIR]["type"] == "tmpfs"
  for mt in mounts:
    assert mt["path"].startswith("/")
    assert set(mt) <= {"type", "path", "uri", "key_name"}
  assert m["sgx"]["allowed_files"] == ["dev:/dev/shm/"]
  assert "insecure__keys" not in m["fs"]


def test_spec_transport_defaults_and_refusals(tmp_path, sock_dir):
  assert _spec(tmp_path, sock_dir).transport == "unix"
  assert _spec(tmp_path, sock_dir, mode="gramine-direct").transport == "tcp"
  tcp = _spec(tmp_path, sock_dir, transport="tcp", socket_path="")
  assert tcp.transport == "tcp" and "--transport=tcp" in launcher.server_argv(tcp)
  with pytest.raises(ValueError, match="needs transport='tcp'"):
    _spec(tmp_path, sock_dir, mode="gramine-sgx", transport="unix")
  with pytest.raises(ValueError, match="transport must be one of"):
    _spec(tmp_path, sock_dir, transport="udp")
  with pytest.raises(ValueError, match="socket_path"):
    _spec(tmp_path, sock_dir, transport="unix", socket_path="")


def test_render_manifest_keys_are_in_gramines_schema(tmp_path, sock_dir):
  # The keys gramine-manifest's schema check knows (graminelibos/manifest_check.py).
  known = {
      "fs": {"mounts", "root", "start_dir", "insecure__keys"},
      "libos": {"entrypoint", "check_invalid_pointers"},
      "loader": {"entrypoint", "argv", "argv_src_file", "env", "env_src_file", "gid",
                 "insecure__use_cmdline_argv", "insecure__use_host_env",
                 "insecure__disable_aslr", "log_file", "log_level", "uid"},
      "sgx": {"allowed_files", "cpu_features", "debug", "edmm_enable", "enable_stats",
              "enclave_size", "file_check_policy", "isvprodid", "isvsvn", "max_threads",
              "preheat_enclave", "remote_attestation", "trusted_files", "use_exinfo"},
      "sys": {"stack", "brk", "enable_sigterm_injection", "disallow_subprocesses",
              "enable_extra_runtime_domain_names_conf", "fds"},
  }
  m = _manifest(_spec(tmp_path, sock_dir, mode="gramine-direct",
                      insecure_fs_key_hex="00112233445566778899aabbccddeeff"))
  assert set(m) <= set(known)
  for table, keys in known.items():
    assert set(m.get(table, {})) <= keys, table
  assert set(m["loader"]["entrypoint"]) == {"uri"}
  assert m["fs"]["insecure__keys"] == {"asymml_key": "00112233445566778899aabbccddeeff"}


def test_render_manifest_unresolved_leaves_gramine_builtins_and_is_toml(tmp_path, sock_dir):
  text = launcher.render_manifest(_spec(tmp_path, sock_dir, mode="gramine-sgx"),
                                  resolve_gramine=False)
  m = tomllib.loads(text)
  assert m["loader"]["entrypoint"]["uri"] == "file:{{ gramine.libos }}"
  assert "file:{{ gramine.runtimedir() }}/" in m["sgx"]["trusted_files"]
  leftover = text.replace("{{ gramine.libos }}", "").replace("{{ gramine.runtimedir() }}", "")
  assert "{{" not in leftover and "{%" not in leftover


def test_render_manifest_escapes_odd_paths(tmp_path, sock_dir):
  odd = tmp_path / 'we"ird\\dir'
  spec = _spec(tmp_path, sock_dir, mode="gramine-sgx", sealed_path=str(odd / "d.sealed"),
               extra_env={"QUOTE": 'a "b" \\c\n'})
  m = _manifest(spec)
  assert f"--sealed={odd}/d.sealed" in m["loader"]["argv"]
  assert m["loader"]["env"]["QUOTE"] == 'a "b" \\c\n'
  with pytest.raises(LauncherError, match="Jinja"):
    launcher.render_manifest(_spec(tmp_path, sock_dir, sealed_path="/data/{{x}}.sealed"))


def test_template_renderer_rejects_unknown_placeholders():
  with pytest.raises(LauncherError, match="unknown placeholder"):
    launcher._render_template("a = {{ nope }}", {})
  with pytest.raises(LauncherError, match="unsupported"):
    launcher._render_template("{% if x %}", {})
  assert launcher._render_template("a = {{x}} {{ y.z() }}", {"x": "1"},
                                   passthrough=("y.z()",)) == "a = 1 {{ y.z() }}"


# ---------------------------------------------------------------------------
# Gramine commands and tools.


def test_gramine_commands(tmp_path, sock_dir):
  man = "/w/asymml_enclave.manifest"
  direct = _spec(tmp_path, sock_dir, mode="gramine-direct")
  assert launcher.gramine_commands(direct, man) == [
      ["gramine-manifest", f"{man}.template", man],
      ["gramine-direct", "asymml_enclave"]]
  sgx = _spec(tmp_path, sock_dir, mode="gramine-sgx", signing_key="/k/enclave.pem")
  assert launcher.gramine_commands(sgx, man) == [
      ["gramine-manifest", f"{man}.template", man],
      ["gramine-sgx-sign", "--manifest", man, "--output", f"{man}.sgx", "--key",
       "/k/enclave.pem"],
      ["gramine-sgx", "asymml_enclave"]]
  with pytest.raises(ValueError):
    launcher.gramine_commands(_spec(tmp_path, sock_dir), man)
  with pytest.raises(ValueError):
    launcher.gramine_commands(sgx, "/w/x.toml")


@pytest.mark.parametrize("mode, tools", [
    ("gramine-direct", ["gramine-manifest", "gramine-direct"]),
    ("gramine-sgx", ["gramine-manifest", "gramine-sgx-sign", "gramine-sgx"]),
])
def test_gramine_modes_without_tools_raise_before_doing_anything(tmp_path, sock_dir,
                                                                 monkeypatch, mode, tools):
  empty = tmp_path / "empty-bin"
  empty.mkdir()
  monkeypatch.setenv("PATH", str(empty))
  spec = _spec(tmp_path, sock_dir, mode=mode)
  with pytest.raises(GramineToolMissing) as e:
    EnclaveProcess(spec).start()
  msg = str(e.value)
  assert msg.startswith(f"{mode} mode needs {', '.join(tools)} on PATH; not found: ")
  assert msg.endswith(", ".join(tools))
  assert isinstance(e.value, LauncherError)
  assert not (tmp_path / "work").exists()  # nothing written


def test_partially_installed_gramine_names_only_missing_tools(tmp_path, sock_dir,
                                                              monkeypatch):
  real = {"gramine-manifest": "/usr/bin/gramine-manifest"}
  monkeypatch.setattr(launcher.shutil, "which", lambda t: real.get(t))
  with pytest.raises(GramineToolMissing, match=r"not found: gramine-sgx-sign, gramine-sgx$"):
    EnclaveProcess(_spec(tmp_path, sock_dir, mode="gramine-sgx")).start()


FAKE_TOOL = """#!{python}
import json, os, pathlib, socket, sys, time
name = os.path.basename(sys.argv[0])
with open(os.environ["FAKE_GRAMINE_LOG"], "a") as f:
  f.write(json.dumps({{"argv": [name, *sys.argv[1:]], "cwd": os.getcwd()}}) + "\\n")
if name == os.environ.get("FAKE_GRAMINE_FAIL"):
  print("fake failure: cannot measure trusted files", file=sys.stderr)
  sys.exit(3)
if name == "gramine-manifest":
  pathlib.Path(sys.argv[2]).write_text(pathlib.Path(sys.argv[1]).read_text())
elif name == "gramine-sgx-sign":
  out = sys.argv[sys.argv.index("--output") + 1]
  man = sys.argv[sys.argv.index("--manifest") + 1]
  pathlib.Path(out).write_text(pathlib.Path(man).read_text())
  pathlib.Path(man[:-len(".manifest")] + ".sig").write_bytes(b"sig")
else:  # gramine-direct / gramine-sgx: load the manifest, act as the server
  suffix = ".manifest.sgx" if name == "gramine-sgx" else ".manifest"
  import tomllib
  manifest = tomllib.loads(pathlib.Path(sys.argv[1] + suffix).read_text())
  assert "--transport=tcp" in manifest["loader"]["argv"]
  assert len(os.environ["ASYMML_BRIDGE_SECRET"]) == 64  # the passthrough variable
  s = socket.socket(socket.AF_INET)
  s.bind(("127.0.0.1", 0))
  s.listen()
  print("fake enclave up", flush=True)
  print(f"enclave: ready on tcp://127.0.0.1:{{s.getsockname()[1]}} (fake)", flush=True)
  time.sleep(600)
"""


def _fake_gramine(tmp_path: pathlib.Path, monkeypatch) -> pathlib.Path:
  bin_dir = tmp_path / "fake-bin"
  bin_dir.mkdir()
  for tool in ("gramine-manifest", "gramine-sgx-sign", "gramine-sgx", "gramine-direct"):
    p = bin_dir / tool
    p.write_text(FAKE_TOOL.format(python=sys.executable))
    p.chmod(0o755)
  log = tmp_path / "fake-gramine.log"
  monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  monkeypatch.setenv("FAKE_GRAMINE_LOG", str(log))
  return log


@pytest.mark.parametrize("mode", ["gramine-direct", "gramine-sgx"])
def test_gramine_modes_run_exactly_the_gramine_commands(tmp_path, sock_dir, monkeypatch,
                                                        mode):
  log = _fake_gramine(tmp_path, monkeypatch)
  spec = _spec(tmp_path, sock_dir, mode=mode)
  workdir = (tmp_path / "work").resolve()
  manifest = str(workdir / "asymml_enclave.manifest")
  with EnclaveProcess(spec).start(timeout=30) as enclave:
    assert enclave.alive()
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c["argv"] for c in calls] == launcher.gramine_commands(spec, manifest)
    assert {c["cwd"] for c in calls} == {str(workdir)}
    template = tomllib.loads((workdir / "asymml_enclave.manifest.template").read_text())
    assert template["loader"]["entrypoint"]["uri"] == "file:{{ gramine.libos }}"
    assert "fake enclave up" in enclave.stderr_tail()
    port = transport.tcp_port(enclave.address)  # found from the ready line
    socket.create_connection(("127.0.0.1", port), timeout=5).close()
    pid = enclave.pid
  assert not enclave.alive() and _gone(pid)
  assert not os.path.exists(spec.socket_path)


def test_gramine_tool_failure_is_a_clear_error(tmp_path, sock_dir, monkeypatch):
  _fake_gramine(tmp_path, monkeypatch)
  monkeypatch.setenv("FAKE_GRAMINE_FAIL", "gramine-sgx-sign")
  with pytest.raises(LauncherError, match=r"gramine-sgx-sign failed with exit code 3") as e:
    EnclaveProcess(_spec(tmp_path, sock_dir, mode="gramine-sgx")).start(timeout=10)
  assert "cannot measure trusted files" in str(e.value)


# ---------------------------------------------------------------------------
# Process ownership.


def test_start_waits_for_the_socket_and_stop_cleans_up(tmp_path, sock_dir):
  spec = _spec(tmp_path, sock_dir)
  enclave = EnclaveProcess(spec, _argv_override=_stand_in_argv(spec, delay=0.4))
  assert enclave.pid is None and not enclave.alive() and enclave.returncode is None
  t0 = time.monotonic()
  assert enclave.start(timeout=20) is enclave
  assert time.monotonic() - t0 >= 0.4
  assert os.path.exists(spec.socket_path) and enclave.alive()
  assert enclave.returncode is None
  pid = enclave.pid
  assert os.getpgid(pid) == pid  # its own process group
  with pytest.raises(LauncherError, match="already running"):
    enclave.start()
  enclave.stop()
  assert not enclave.alive() and enclave.returncode is not None
  assert not os.path.exists(spec.socket_path)
  assert _gone(pid)
  enclave.stop()  # idempotent
  EnclaveProcess(spec).stop()  # never started: no-op


def test_context_manager_stops_on_exception(tmp_path, sock_dir):
  spec = _spec(tmp_path, sock_dir)
  with pytest.raises(RuntimeError, match="driver crashed"):
    with EnclaveProcess(spec, _argv_override=_stand_in_argv(spec)) as enclave:
      pid = enclave.pid
      assert enclave.alive()
      raise RuntimeError("driver crashed")
  assert not enclave.alive() and _gone(pid)
  assert not os.path.exists(spec.socket_path)


def test_child_that_exits_early_raises_with_its_stderr(tmp_path, sock_dir):
  spec = _spec(tmp_path, sock_dir)
  argv = [sys.executable, "-c",
          "import sys; print('enclave: cannot open the sealed data set: bad tag', "
          "file=sys.stderr); sys.exit(2)"]
  with pytest.raises(LauncherError) as e:
    EnclaveProcess(spec, _argv_override=argv).start(timeout=20)
  assert "exited with code 2" in str(e.value)
  assert "cannot open the sealed data set: bad tag" in str(e.value)


def test_child_that_never_binds_times_out_and_is_killed(tmp_path, sock_dir):
  spec = _spec(tmp_path, sock_dir)
  enclave = EnclaveProcess(spec, _argv_override=[
      sys.executable, "-c", "import time; print('warming up', flush=True); time.sleep(600)"])
  with pytest.raises(LauncherError, match=r"did not open its socket .* within 1 s") as e:
    enclave.start(timeout=1.0)
  assert "warming up" in str(e.value)
  assert not enclave.alive() and enclave.returncode is not None


def test_stale_socket_is_replaced_and_live_one_refused(tmp_path, sock_dir):
  spec = _spec(tmp_path, sock_dir)
  stale = socket.socket(socket.AF_UNIX)
  stale.bind(spec.socket_path)
  stale.close()  # the file stays, nobody listens
  enclave = EnclaveProcess(spec, _argv_override=_stand_in_argv(spec, delay=0.3))
  t0 = time.monotonic()
  enclave.start(timeout=20)
  assert time.monotonic() - t0 >= 0.3  # did not mistake the stale file for readiness
  try:
    other = EnclaveProcess(spec, _argv_override=_stand_in_argv(spec))
    with pytest.raises(LauncherError, match="in use"):
      other.start(timeout=5)
    assert enclave.alive()  # untouched
  finally:
    enclave.stop()
  pathlib.Path(spec.socket_path).write_text("not a socket")
  with pytest.raises(LauncherError, match="not a socket"):
    EnclaveProcess(spec, _argv_override=_stand_in_argv(spec)).start(timeout=5)


def test_relative_socket_path_in_use_is_detected(tmp_path, sock_dir, monkeypatch):
  monkeypatch.chdir(sock_dir)
  spec = _spec(tmp_path, sock_dir, socket_path="rel.sock")
  with EnclaveProcess(spec, _argv_override=_stand_in_argv(spec)).start(timeout=20) as first:
    with pytest.raises(LauncherError, match="in use"):
      EnclaveProcess(spec, _argv_override=_stand_in_argv(spec)).start(timeout=5)
    assert first.alive() and os.path.exists(sock_dir / "rel.sock")
  assert not os.path.exists(sock_dir / "rel.sock")


DRIVER = textwrap.dedent("""
  import signal, sys, time
  signal.signal(signal.SIGINT, signal.default_int_handler)  # as in an interactive shell
  from enclave_bridge.launcher import EnclaveProcess, EnclaveSpec
  spec = EnclaveSpec(socket_path=sys.argv[1], sealed_path="x", key_path="y",
                     workdir=sys.argv[2])
  argv = [sys.executable, "-c", sys.argv[3], sys.argv[1]]
  with EnclaveProcess(spec, _argv_override=argv).start(timeout=30) as enclave:
    print(enclave.pid, flush=True)
    time.sleep(600)
""")


def _start_driver(tmp_path: pathlib.Path, sock: str) -> tuple[subprocess.Popen, int]:
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  driver = subprocess.Popen(
      [sys.executable, "-c", DRIVER, sock, str(tmp_path / "work"), STAND_IN], cwd=ROOT,
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  line = driver.stdout.readline()
  assert line.strip().isdigit(), driver.stderr.read() if driver.poll() is not None else line
  return driver, int(line)


@pytest.mark.fault("driver_sigkill")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_no_orphan_enclave_when_the_driver_dies(tmp_path, sock_dir, sig):
  sock = str(sock_dir / "e.sock")
  driver, child = _start_driver(tmp_path, sock)
  try:
    assert not _gone(child, within=0.2)  # running
    t0 = time.monotonic()
    driver.send_signal(sig)
    driver.wait(timeout=10)
    within = fault_table.bound("driver_sigkill")
    assert _gone(child, within=max(0.0, within - (time.monotonic() - t0))), (
        f"enclave {child} outlived {sig.name} of its driver by {within} s")
    if sig != signal.SIGKILL:  # graceful paths also remove the socket
      assert not os.path.exists(sock)
      assert "Traceback" not in driver.stderr.read() or sig == signal.SIGINT
  finally:
    if driver.poll() is None:
      driver.kill()
    try:
      os.kill(child, signal.SIGKILL)
    except ProcessLookupError:
      pass


# ---------------------------------------------------------------------------
# The real server (enclave_bridge.server) on a tiny sealed data set.


@pytest.fixture
def sealed_tiny(tmp_path):
  import numpy as np
  from asymml_jax.data import Dataset
  from enclave_bridge import seal
  rng = np.random.default_rng(0)
  ds = Dataset(name="tiny", num_classes=3,
               train_images=rng.standard_normal((6, 4, 5, 3)).astype(np.float32),
               train_labels=np.array([0, 1, 2, 0, 1, 2], np.int32),
               test_images=rng.standard_normal((3, 4, 5, 3)).astype(np.float32),
               test_labels=np.array([2, 1, 0], np.int32))
  key = tmp_path / "key.bin"
  seal.generate_key_file(str(key))
  seal.seal_dataset(ds, str(tmp_path / "tiny.sealed"), str(key))
  return tmp_path / "tiny.sealed", key


def test_starts_and_stops_the_real_server(tmp_path, sock_dir, sealed_tiny):
  sealed, key = sealed_tiny
  spec = _spec(tmp_path, sock_dir, sealed_path=str(sealed), key_path=str(key))
  with EnclaveProcess(spec).start(timeout=60) as enclave:
    assert enclave.alive() and os.path.exists(spec.socket_path)
    assert "6 train / 3 test samples" in enclave.stderr_tail()
  assert not os.path.exists(spec.socket_path) and enclave.returncode is not None


@pytest.mark.fault("wrong_key")
def test_real_server_with_wrong_key_fails_with_its_message(tmp_path, sock_dir, sealed_tiny):
  sealed, _ = sealed_tiny
  from enclave_bridge import seal
  other = tmp_path / "other.key"
  seal.generate_key_file(str(other))
  spec = _spec(tmp_path, sock_dir, sealed_path=str(sealed), key_path=str(other))
  with pytest.raises(LauncherError, match="cannot open the sealed data set"):
    EnclaveProcess(spec).start(timeout=60)


def test_cli_subprocess_mode_runs_until_ctrl_c(tmp_path, sock_dir, sealed_tiny):
  sealed, key = sealed_tiny
  sock = sock_dir / "cli.sock"
  cli = subprocess.Popen(
      [sys.executable, "-c",
       "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
       "from enclave_bridge.launcher import main; sys.exit(main())",
       f"--sealed={sealed}", f"--key={key}", f"--socket={sock}",
       f"--workdir={tmp_path / 'w'}"],
      cwd=ROOT, stderr=subprocess.PIPE, text=True)
  try:
    line = cli.stderr.readline()
    assert "listening on" in line and str(sock) in line, line + cli.stderr.read()
    assert sock.exists()
    cli.send_signal(signal.SIGINT)
    assert cli.wait(timeout=20) == 130
    assert "Traceback" not in cli.stderr.read()
    assert not sock.exists()
  finally:
    if cli.poll() is None:
      cli.kill()


# ---------------------------------------------------------------------------
# Command line.


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "enclave_bridge.launcher", *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=60)


def test_cli_dry_run_prints_toml_manifest_and_commands():
  p = _cli("--mode=gramine-sgx", "--dry-run")
  assert p.returncode == 0, p.stderr
  m = tomllib.loads(p.stdout)
  assert m["sgx"]["enclave_size"] == "8G"
  assert f"--sealed={ROOT}/runs/demo/mnist5k.sealed" in m["loader"]["argv"]
  assert "--transport=tcp" in m["loader"]["argv"]  # Gramine's default
  assert not any(a.startswith("--socket") for a in m["loader"]["argv"])
  assert "# transport: tcp (the server binds 127.0.0.1" in p.stdout
  comments = [l for l in p.stdout.splitlines() if l.startswith("#   gramine")]
  assert [c.split()[1] for c in comments] == [
      "gramine-manifest", "gramine-sgx-sign", "gramine-sgx"]


def test_cli_dry_run_flags(tmp_path):
  p = _cli("--mode=gramine-direct", "--dry-run", "--sealed=/d/x.sealed", "--key=/d/k.bin",
           "--socket=/tmp/other.sock", "--threads=4", "--enclave_size=16G",
           f"--workdir={tmp_path}")
  assert p.returncode == 0, p.stderr
  m = tomllib.loads(p.stdout)
  assert m["sgx"]["enclave_size"] == "16G"
  assert m["loader"]["argv"][-4:] == ["--transport=tcp", "--sealed=/d/x.sealed",
                                      "--key=/d/k.bin", "--threads=4"]
  assert f"{tmp_path}/asymml_enclave.manifest" in p.stdout
  assert not any(tmp_path.iterdir())  # dry run writes nothing


def test_cli_gramine_sgx_without_gramine_fails_in_one_line(tmp_path):
  env = dict(os.environ, PATH=str(tmp_path))  # no gramine tools anywhere
  p = _cli("--mode=gramine-sgx", f"--workdir={tmp_path / 'w'}", env=env)
  assert p.returncode != 0
  assert "Traceback" not in p.stderr
  lines = p.stderr.strip().splitlines()
  assert len(lines) == 1, p.stderr
  assert "gramine-sgx-sign" in lines[0] and "gramine-manifest" in lines[0]
  assert lines[0].startswith("error: gramine-sgx mode needs")


def test_cli_bad_values_fail_cleanly():
  p = _cli("--mode=gramine-sgx", "--dry-run", "--enclave_size=3G")
  assert p.returncode != 0 and "power of two" in p.stderr and "Traceback" not in p.stderr
