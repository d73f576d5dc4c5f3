"""Nothing in the native-kernel cache is trusted by its name: ``unet_jax.cpu.native._open`` loads
a library only from a private directory, and only the bytes whose digest it recorded when it
built them. A library whose constructor writes a marker file stands in for the kernels, so
these tests run on any x86-64 or ARM Linux with a C compiler, AVX-512 or not."""

import hashlib
import os
import pathlib
import platform
import shutil
import stat
import subprocess
import sys

import pytest

from unet_jax.cpu import native

pytestmark = pytest.mark.skipif(shutil.which("cc") is None,
                                reason="needs a C compiler to build the stand-in libraries")

SOURCE = r"""
#include <stdio.h>
__attribute__((constructor)) static void mark(void) {
  FILE *f = fopen(MARKER, "w"); if (f) { fputs("ran", f); fclose(f); }
}
void UnetJaxConvForward(void) {}
void UnetJaxConvKernelGrad(void) {}
"""


def _library(tmp_path: pathlib.Path, name: str) -> tuple[pathlib.Path, pathlib.Path]:
  """A shared library (outside the cache) whose constructor writes ``tmp_path/<name>.ran``."""
  marker, source = tmp_path / f"{name}.ran", tmp_path / f"{name}.c"
  source.write_text(SOURCE)
  library = tmp_path / f"{name}.so"
  subprocess.run(["cc", "-shared", "-fPIC", f'-DMARKER="{marker}"', str(source), "-o",
                  str(library)], check=True)
  return library, marker


def _copies(built: pathlib.Path, calls: list | None = None):
  """A ``build`` for ``_open``: writes ``built``'s bytes to the output it is given."""
  def build(output: pathlib.Path) -> None:
    shutil.copyfile(built, output)
    if calls is not None:
      calls.append(output)
  return build


def _no_build(output):
  raise AssertionError("nothing should be built here")


def _no_compiler(output):
  raise native._Unavailable("no C++ compiler found (set CXX, or install g++)")


@pytest.fixture
def cache(tmp_path) -> pathlib.Path:
  directory = tmp_path / "cache"
  native._make_private_directory(directory)
  return directory


def _plant(built: pathlib.Path, cache: pathlib.Path) -> pathlib.Path:
  """``built`` copied into ``cache`` under the kernels' name, private, as its owner would."""
  library = cache / "conv-0123456789abcdef.so"
  shutil.copyfile(built, library)
  library.chmod(0o700)
  return library


def test_a_library_built_through_the_cache_loads_with_its_digest_recorded(tmp_path, cache):
  built, marker = _library(tmp_path, "ours")
  library = cache / "conv-0123456789abcdef.so"
  lib = native._open(library, build=_copies(built))
  assert lib.UnetJaxConvForward and marker.exists()
  recorded = (cache / f"{library.name}.sha256").read_text().strip()
  assert recorded == hashlib.sha256(library.read_bytes()).hexdigest()
  assert stat.S_IMODE(library.stat().st_mode) == 0o700
  # Built in a private temporary file and renamed: nothing else is left in the directory.
  assert sorted(p.name for p in cache.iterdir()) == [library.name, f"{library.name}.sha256"]
  native._open(library, build=_no_build)  # a second process finds it and builds nothing


def test_a_planted_library_with_the_right_name_never_runs(tmp_path, cache):
  """The issue's case: a library under the name the package computes, private and owned by
  this user, but not built by the package. Its constructor would write a marker."""
  planted, planted_marker = _library(tmp_path, "planted")
  ours, our_marker = _library(tmp_path, "ours")
  library = _plant(planted, cache)
  with pytest.warns(RuntimeWarning, match="has no recorded digest"):
    native._open(library, build=_copies(ours))
  assert not planted_marker.exists()
  assert our_marker.exists() and library.read_bytes() == ours.read_bytes()


def test_a_planted_library_is_refused_when_nothing_can_be_built(tmp_path, cache):
  planted, marker = _library(tmp_path, "planted")
  library = _plant(planted, cache)
  with pytest.warns(RuntimeWarning, match="has no recorded digest"), \
       pytest.raises(native._Unavailable, match="no C\\+\\+ compiler"):
    native._open(library, build=_no_compiler)
  assert not marker.exists()


def test_a_library_replaced_after_it_was_built_never_runs(tmp_path, cache):
  ours, our_marker = _library(tmp_path, "ours")
  planted, planted_marker = _library(tmp_path, "planted")
  library = cache / "conv-0123456789abcdef.so"
  native._install(library, _copies(ours))  # built and recorded, not loaded
  shutil.copyfile(planted, library)  # same name, same owner and mode, other bytes
  with pytest.warns(RuntimeWarning, match="not the .* recorded when it was built"), \
       pytest.raises(native._Unavailable, match="no C\\+\\+ compiler"):
    native._open(library, build=_no_compiler)
  assert not planted_marker.exists() and not our_marker.exists()


def test_a_damaged_library_is_built_again(tmp_path, cache):
  ours, marker = _library(tmp_path, "ours")
  library = cache / "conv-0123456789abcdef.so"
  native._install(library, _copies(ours))
  damaged = bytearray(library.read_bytes())
  damaged[len(damaged) // 2] ^= 0xFF  # still an ELF file that may well load
  library.write_bytes(bytes(damaged))
  calls = []
  with pytest.warns(RuntimeWarning, match="damaged or was replaced"):
    native._open(library, build=_copies(ours, calls))
  assert len(calls) == 1 and library.read_bytes() == ours.read_bytes() and marker.exists()


def test_a_digest_record_that_others_could_write_is_not_believed(tmp_path, cache):
  planted, marker = _library(tmp_path, "planted")
  library = _plant(planted, cache)
  record = cache / f"{library.name}.sha256"
  record.write_text(hashlib.sha256(planted.read_bytes()).hexdigest() + "\n")
  record.chmod(0o666)
  with pytest.warns(RuntimeWarning, match="has no recorded digest"), \
       pytest.raises(native._Unavailable):
    native._open(library, build=_no_compiler)
  assert not marker.exists()


def test_a_digest_record_that_is_a_symbolic_link_is_not_believed(tmp_path, cache):
  planted, marker = _library(tmp_path, "planted")
  library = _plant(planted, cache)
  elsewhere = tmp_path / "digest"
  elsewhere.write_text(hashlib.sha256(planted.read_bytes()).hexdigest() + "\n")
  (cache / f"{library.name}.sha256").symlink_to(elsewhere)
  with pytest.warns(RuntimeWarning, match="has no recorded digest"), \
       pytest.raises(native._Unavailable):
    native._open(library, build=_no_compiler)
  assert not marker.exists()


@pytest.mark.parametrize("directory_mode,library_mode,message", [
    (0o777, 0o700, "directory .* is writable by others"),
    (0o770, 0o700, "directory .* is writable by its group"),
    (0o700, 0o722, "library .* is writable by others"),
])
def test_a_library_others_could_have_written_never_runs(tmp_path, cache, directory_mode,
                                                         library_mode, message):
  planted, marker = _library(tmp_path, "planted")
  library = cache / "conv-0123456789abcdef.so"
  native._install(library, _copies(planted))  # even with a matching digest
  library.chmod(library_mode)
  cache.chmod(directory_mode)
  with pytest.warns(RuntimeWarning), pytest.raises(native._Unavailable, match=message):
    native._open(library, build=_no_build)
  assert not marker.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_a_library_of_another_user_never_runs(tmp_path, cache):
  planted, marker = _library(tmp_path, "planted")
  library = cache / "conv-0123456789abcdef.so"
  native._install(library, _copies(planted))
  os.chown(library, 65534, 65534)
  with pytest.warns(RuntimeWarning, match="belongs to user id 65534"), \
       pytest.raises(native._Unavailable, match="belongs to user id 65534"):
    native._open(library, build=_no_build)
  assert not marker.exists()


def test_a_symbolic_link_in_place_of_the_library_is_refused(tmp_path, cache):
  planted, marker = _library(tmp_path, "planted")
  library = cache / "conv-0123456789abcdef.so"
  native._install(library, _copies(planted))
  library.unlink()
  library.symlink_to(planted)  # the same bytes, through a link
  with pytest.warns(RuntimeWarning), pytest.raises(native._Unavailable,
                                                   match="is a symbolic link"):
    native._open(library, build=_no_build)
  assert not marker.exists()


def test_a_library_that_does_not_load_is_built_again_once(cache):
  library = cache / "conv-damaged.so"
  library.write_bytes(b"not a shared object")
  library.chmod(0o700)
  built = []
  with pytest.warns(RuntimeWarning, match="no recorded digest"), \
       pytest.raises(native._Unavailable, match="does not load"):  # nothing loadable is built
    native._open(library, build=lambda output: built.append(output.write_bytes(b"still not")))
  assert len(built) == 1


def test_a_failed_build_leaves_nothing_behind(cache):
  with pytest.raises(native._Unavailable, match="no C\\+\\+ compiler"):
    native._open(cache / "conv-0123456789abcdef.so", build=_no_compiler)
  assert list(cache.iterdir()) == []


def _available_in_subprocess(cache: pathlib.Path, compiler: pathlib.Path):
  """``native.available()`` in a fresh process that takes this CPU for an AVX-512 one and
  builds with ``compiler``: the whole path from the cache's name to ``dlopen``."""
  code = ("from unet_jax.cpu import native\n"
          "native._cpu_flags = lambda: 'flags\\t\\t: fpu sse2 avx2 avx512f'\n"
          "print(native.available(), native.status(), sep='|')\n")
  env = {**os.environ, "UNET_JAX_CACHE_DIR": str(cache), "CXX": str(compiler),
         "JAX_PLATFORMS": "cpu", "PYTHONWARNINGS": "always"}
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout.strip().splitlines()[-1].split("|"), result.stderr


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the kernels are built on x86-64 only")
def test_a_library_planted_under_the_computed_name_never_runs_in_a_fresh_process(tmp_path):
  """The report's reproduction, end to end: a library planted where the package will look
  (the name computed from the source, jaxlib, the compiler and the CPU) is not loaded; the
  package builds its own in its place."""
  ours, our_marker = _library(tmp_path, "ours")
  planted, planted_marker = _library(tmp_path, "planted")
  compiler = tmp_path / "c++"  # "compiles" the kernels by copying the stand-in library
  compiler.write_text("#!/bin/sh\n"
                      "case \"$1\" in --version) echo 'stand-in 1.0'; exit 0;; esac\n"
                      f"for a; do out=$a; done\ncp {ours} \"$out\"\n")
  compiler.chmod(0o755)
  cache = tmp_path / "cache"
  (available, reason), _ = _available_in_subprocess(cache, compiler)
  assert available == "True" and our_marker.exists(), reason
  (library,) = cache.glob("conv-*.so")

  our_marker.unlink()
  shutil.copyfile(planted, library)
  (cache / f"{library.name}.sha256").unlink()
  (available, reason), stderr = _available_in_subprocess(cache, compiler)
  assert available == "True", reason
  assert "has no recorded digest" in stderr
  assert not planted_marker.exists() and our_marker.exists()
  assert library.read_bytes() == ours.read_bytes()
