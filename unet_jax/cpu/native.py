"""Native CPU convolution kernels (``csrc/conv.cc``), compiled on first use, with fallback.

XLA's CPU backend runs convolutions with few channels (16–64, the top of a U-Net) on a
general contraction that reaches a third to a half of this hardware's speed there. The two
kernels in ``csrc/conv.cc``, a forward convolution and a kernel gradient written for the
NHWC/HWIO layouts and AVX-512, run them at the speed of PyTorch's oneDNN kernels or faster
(``docs/performance.md``). ``unet_jax.cpu.ops`` calls them through ``jax.ffi`` on the CPU
backend for float32 convolutions whose output channels are a multiple of 16, and XLA's own
convolution everywhere else. Only a model switched to the CPU layer (``unet_jax.cpu``) uses
them; importing this module compiles and loads nothing.

Nothing is compiled at install time. The first convolution traced by such a model compiles the
source with the system's C++ compiler (``$CXX``, else ``c++``/``g++``; 2–3 seconds) into a
cache directory (``$UNET_JAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/unet_jax``, else
``~/.cache/unet_jax``), keyed by the source, the jaxlib version, the compiler and the CPU, and
later processes load it from there. Without a compiler, an AVX-512 x86-64 CPU under Linux,
or a writable cache directory, the package uses XLA's convolutions and says why in
``status()``. ``UNET_JAX_NATIVE=0`` turns the kernels off.

Nothing in the cache is trusted by its name. The cache directory is created with mode 0700,
and a directory or library that belongs to another user, is writable by the group or by
others, or (the library) is a symbolic link is refused with a warning, and XLA's convolutions
are used instead. A library is compiled into a private temporary file beside its final name;
its SHA-256 digest is written to ``<library>.sha256`` and the file is then renamed into place.
Before loading, the library is opened once, its bytes are hashed through that open file, and
only when they match the recorded digest is that same file (``/proc/self/fd/N``, so it cannot
be swapped in between) handed to the dynamic loader. A library with no recorded digest or a
different one (damaged, or put there by something else) never runs: it is compiled again,
with a warning, and if that fails XLA's convolutions are used. A cached library that does not
load is compiled again once.

Both kernels give the same result, bit for bit, on every call: the kernel gradient sums
fixed blocks of rows in a fixed order, whichever thread computed each.

Loading the library runs no code but the two kernels, which only read and write the buffers
XLA hands them.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import stat
import tempfile
import threading
import warnings

import jax
import jax.numpy as jnp
import jaxlib

SOURCE = pathlib.Path(__file__).with_name("csrc") / "conv.cc"
FORWARD, KERNEL_GRAD = "unet_jax_conv_forward", "unet_jax_conv_kernel_grad"

_lock = threading.Lock()
_state: dict = {}


def enabled_by_environment() -> bool:
  return os.environ.get("UNET_JAX_NATIVE", "1").strip().lower() not in ("0", "false", "no",
                                                                        "off")


def available() -> bool:
  """Whether the native kernels are compiled, loaded and registered with XLA (once a process)."""
  with _lock:
    if "available" not in _state:
      try:
        _state["path"] = _load()
        _state["available"], _state["reason"] = True, f"loaded from {_state['path']}"
      except _Unavailable as reason:
        _state["available"], _state["reason"] = False, str(reason)
    return _state["available"]


def status() -> str:
  """Why the native kernels are (or are not) in use, in one line."""
  available()
  return _state["reason"]


class _Unavailable(Exception):
  pass


def _cpu_flags() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next((line for line in f if line.startswith("flags")), "")
  except OSError:
    return ""


def _compiler() -> str | None:
  for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
    if name and (path := shutil.which(name)):
      return path
  return None


def cache_dir() -> pathlib.Path:
  """The package's cache directory (see the module's docstring)."""
  if os.environ.get("UNET_JAX_CACHE_DIR"):
    return pathlib.Path(os.environ["UNET_JAX_CACHE_DIR"])
  base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
  return pathlib.Path(base) / "unet_jax"


def _load() -> pathlib.Path:
  if not enabled_by_environment():
    raise _Unavailable("turned off by UNET_JAX_NATIVE=0")
  if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
    raise _Unavailable(f"needs Linux on x86-64, this is {platform.system()} on "
                       f"{platform.machine()}")
  flags = _cpu_flags()
  if " avx512f " not in f"{flags} ":
    raise _Unavailable("this CPU has no AVX-512")
  compiler = _compiler()
  if compiler is None:
    raise _Unavailable("no C++ compiler found (set CXX, or install g++)")
  try:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                             timeout=30).stdout
  except (OSError, subprocess.SubprocessError) as error:
    raise _Unavailable(f"the C++ compiler {compiler} does not run: {error}") from error
  source = SOURCE.read_bytes()
  key = hashlib.sha256(b"\0".join([source, jaxlib.__version__.encode(), version.encode(),
                                   flags.encode()])).hexdigest()[:16]
  library = cache_dir() / f"conv-{key}.so"
  lib = _open(library, build=lambda output: _compile(compiler, output))
  jax.ffi.register_ffi_target(FORWARD, jax.ffi.pycapsule(lib.UnetJaxConvForward),
                              platform="cpu")
  jax.ffi.register_ffi_target(KERNEL_GRAD, jax.ffi.pycapsule(lib.UnetJaxConvKernelGrad),
                              platform="cpu")
  return library


def _open(library: pathlib.Path, *, build) -> ctypes.CDLL:
  """Load the kernels' ``library`` from its private directory, calling ``build(path)`` to write
  a fresh library to ``path`` when the cached one is missing, does not match its recorded
  digest or does not load; raises ``_Unavailable`` for anything unsafe."""
  _make_private_directory(library.parent)
  _check_private(library.parent, kind="directory")
  if os.path.lexists(library):
    try:
      return _with_kernels(_load_verified(library))
    except _Unverified as problem:
      warnings.warn(f"{problem}; compiling it again", RuntimeWarning, stacklevel=3)
    except (OSError, AttributeError):
      pass  # a damaged cache entry that its digest did not catch: build it once more
  _install(library, build)
  try:
    return _with_kernels(_load_verified(library))
  except _Unverified as problem:  # another process replaced it meanwhile
    raise _Unavailable(str(problem)) from problem
  except (OSError, AttributeError) as error:
    raise _Unavailable(f"{library} does not load: {error}") from error


def _with_kernels(lib: ctypes.CDLL) -> ctypes.CDLL:
  lib.UnetJaxConvForward, lib.UnetJaxConvKernelGrad  # noqa: B018 (AttributeError if absent)
  return lib


class _Unverified(Exception):
  """A library that is not the one this package built: no digest, or another one."""


def _digest_path(library: pathlib.Path) -> pathlib.Path:
  return library.with_name(library.name + ".sha256")


def _sha256(fd: int) -> str:
  digest, offset = hashlib.sha256(), 0
  while chunk := os.pread(fd, 1 << 20, offset):
    digest.update(chunk)
    offset += len(chunk)
  return digest.hexdigest()


def _recorded_digest(library: pathlib.Path) -> str | None:
  """The digest recorded when ``library`` was built, or None when there is no readable,
  private record of one."""
  try:
    fd = os.open(_digest_path(library), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
  except OSError:
    return None
  try:
    info = os.fstat(fd)
    if (not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid()
        or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)):
      return None
    text = os.read(fd, 128).decode("ascii", "replace").strip()
  finally:
    os.close(fd)
  return text if len(text) == 64 and all(c in "0123456789abcdef" for c in text) else None


def _load_verified(library: pathlib.Path) -> ctypes.CDLL:
  """``dlopen`` ``library`` only if it is private and its bytes match the digest recorded when
  it was built; raises ``_Unavailable`` (unsafe place), ``_Unverified`` (digest) or
  ``OSError`` (does not load)."""
  _check_private(library, kind="library")
  fd = os.open(library, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
  try:
    _check_private(library, kind="library", info=os.fstat(fd))
    actual, recorded = _sha256(fd), _recorded_digest(library)
    if recorded is None:
      raise _Unverified(f"the native library {library} has no recorded digest "
                        f"({_digest_path(library).name}): it was not built here")
    if actual != recorded:
      raise _Unverified(f"the native library {library} has SHA-256 {actual[:16]}…, not the "
                        f"{recorded[:16]}… recorded when it was built: it is damaged or was "
                        f"replaced")
    # The loader opens the file already hashed, even if the name has been taken meanwhile.
    lib = ctypes.CDLL(f"/proc/self/fd/{fd}")
  except BaseException:
    os.close(fd)
    raise
  # The descriptor stays open, so that its /proc name never names another library in this
  # process (the loader would take that name for the library already loaded).
  lib._unet_jax_fd = fd
  return lib


def _install(library: pathlib.Path, build) -> None:
  """Build into a fresh private file beside ``library``, record its digest, then rename it
  into place (atomic: a concurrent process sees all of it or nothing)."""
  partial = digest_partial = None
  try:
    fd, partial = tempfile.mkstemp(prefix=f".{library.name}.", dir=library.parent)
    os.close(fd)
    build(pathlib.Path(partial))
    os.chmod(partial, 0o700)  # a linker applies the umask, which may let others write
    fd = os.open(partial, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
      digest = _sha256(fd)
    finally:
      os.close(fd)
    fd, digest_partial = tempfile.mkstemp(prefix=f".{library.name}.sha256.",
                                          dir=library.parent)
    with os.fdopen(fd, "w") as f:
      f.write(digest + "\n")
    os.replace(digest_partial, _digest_path(library))
    os.replace(partial, library)
  except OSError as error:
    raise _Unavailable(f"cannot write the native library to {library.parent}: {error}; set "
                       f"UNET_JAX_CACHE_DIR to a writable directory of your own") from error
  finally:
    for leftover in (partial, digest_partial):
      if leftover and os.path.lexists(leftover):
        os.unlink(leftover)


def _make_private_directory(directory: pathlib.Path) -> None:
  """Create ``directory`` (mode 0700) unless it exists."""
  if os.path.lexists(directory):
    return
  try:
    directory.parent.mkdir(parents=True, exist_ok=True)
    directory.mkdir(mode=0o700)
  except FileExistsError:
    pass  # another process made it meanwhile; checked below like any other
  except OSError as error:
    raise _Unavailable(f"the cache directory {directory} cannot be created: {error}; set "
                       f"UNET_JAX_CACHE_DIR to a directory of your own") from error


def _check_private(path: pathlib.Path, *, kind: str, info: os.stat_result | None = None) -> None:
  """Refuse ``path`` (or the open file whose ``info`` is given) unless it belongs to this user
  and only this user can write it."""
  try:
    info = info or (os.lstat(path) if kind == "library" else os.stat(path))
  except OSError as error:
    raise _Unavailable(f"the {kind} {path} cannot be read: {error}") from error
  problem = None
  if kind == "library" and stat.S_ISLNK(info.st_mode):
    problem = "is a symbolic link"
  elif kind == "library" and not stat.S_ISREG(info.st_mode):
    problem = "is not a regular file"
  elif kind == "directory" and not stat.S_ISDIR(info.st_mode):
    problem = "is not a directory"
  elif info.st_uid != os.geteuid():
    problem = f"belongs to user id {info.st_uid}, not to this user ({os.geteuid()})"
  elif info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
    problem = f"is writable by {'others' if info.st_mode & stat.S_IWOTH else 'its group'} " \
              f"(mode {stat.S_IMODE(info.st_mode):o})"
  if problem:
    message = (f"not loading the native kernels: the {kind} {path} {problem}; a library "
               f"there could run another user's code. Using XLA's convolutions. Fix it with "
               f"chmod 700 / chown, or set UNET_JAX_CACHE_DIR to a directory of your own.")
    warnings.warn(message, RuntimeWarning, stacklevel=4)
    raise _Unavailable(message)


def _compile(compiler: str, output: pathlib.Path) -> None:
  command = [compiler, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC",
             "-w", f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(output)]
  try:
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
  except (OSError, subprocess.SubprocessError) as error:
    raise _Unavailable(f"compiling {SOURCE.name} failed: {error}") from error
  if result.returncode != 0:
    raise _Unavailable(f"compiling {SOURCE.name} failed: {result.stderr.strip()[-500:]}")


def conv_forward(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Unpadded, stride-1 NHWC/HWIO convolution (float32; output channels a multiple of 16)."""
  n, h, w, _ = x.shape
  kh, kw, _, o = kernel.shape
  out = jax.ShapeDtypeStruct((n, h - kh + 1, w - kw + 1, o), jnp.float32)
  return jax.ffi.ffi_call(FORWARD, out, vmap_method="sequential")(x, kernel)


def conv_kernel_grad(x: jax.Array, g: jax.Array, kernel_shape) -> jax.Array:
  """The kernel gradient of ``conv_forward(x, kernel)`` for the output gradient ``g``."""
  out = jax.ShapeDtypeStruct(tuple(kernel_shape), jnp.float32)
  return jax.ffi.ffi_call(KERNEL_GRAD, out, vmap_method="sequential")(x, g)

