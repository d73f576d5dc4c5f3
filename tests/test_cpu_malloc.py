"""``unet_jax.cpu.malloc``: which glibc options the CPU layer sets, and when not."""

import os
import subprocess
import sys
import textwrap

import pytest

from unet_jax.cpu import malloc as malloc_defaults

GLIBC = malloc_defaults._libc() is not None


class FakeLibc:
  """Records ``mallopt`` calls instead of changing this process's allocator."""

  def __init__(self):
    self.calls = []

  def mallopt(self, param, value):
    self.calls.append((param.value, value.value))
    return 1


@pytest.fixture
def fresh(monkeypatch):
  """``apply()`` as on a fresh import, with glibc's environment variables cleared."""
  libc = FakeLibc()
  monkeypatch.setattr(malloc_defaults, "_applied", [])
  monkeypatch.setattr(malloc_defaults, "_libc", lambda: libc)
  monkeypatch.setattr(malloc_defaults, "_accelerator_plugin_installed", lambda: False)
  for name in ("UNET_JAX_MALLOC_DEFAULTS", "LD_PRELOAD", "GLIBC_TUNABLES", "JAX_PLATFORMS",
               *(option[2] for option in malloc_defaults.OPTIONS.values())):
    monkeypatch.delenv(name, raising=False)
  return libc


def test_sets_every_option(fresh):
  assert malloc_defaults.apply() == list(malloc_defaults.OPTIONS)
  assert fresh.calls == [(param, value) for param, value, *_ in malloc_defaults.OPTIONS.values()]
  assert malloc_defaults.applied() == list(malloc_defaults.OPTIONS)
  assert malloc_defaults.apply() == list(malloc_defaults.OPTIONS)  # once only
  assert len(fresh.calls) == len(malloc_defaults.OPTIONS)


@pytest.mark.parametrize("env", [{"UNET_JAX_MALLOC_DEFAULTS": "0"},
                                 {"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"},
                                 {"LD_PRELOAD": "libtcmalloc_minimal.so.4"}])
def test_declined_or_other_allocator(fresh, monkeypatch, env):
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  assert malloc_defaults.apply() == [] and fresh.calls == []


def test_accelerator_hosts_are_left_alone_unless_jax_runs_on_cpu(fresh, monkeypatch):
  monkeypatch.setattr(malloc_defaults, "_accelerator_plugin_installed", lambda: True)
  assert malloc_defaults.apply() == [] and fresh.calls == []
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert malloc_defaults.apply() == list(malloc_defaults.OPTIONS)


def test_the_users_own_settings_win_option_by_option(fresh, monkeypatch):
  monkeypatch.setenv("MALLOC_MMAP_MAX_", "65536")
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1000000")
  assert malloc_defaults.apply() == []
  monkeypatch.delenv("GLIBC_TUNABLES")
  assert malloc_defaults.apply() == ["M_TRIM_THRESHOLD"]


def test_no_glibc_no_options(fresh, monkeypatch):
  monkeypatch.setattr(malloc_defaults, "_libc", lambda: None)
  assert malloc_defaults.apply() == []


_FAULTS = textwrap.dedent("""
    import ctypes, os
    from unet_jax import cpu
    from unet_jax.cpu import malloc as malloc_defaults
    cpu.configure_process("on")
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size = 64 << 20
    def faults():
      return int(open("/proc/self/stat").read().split()[9])
    block = libc.malloc(size); ctypes.memset(block, 1, size); libc.free(block)
    before = faults()
    block = libc.malloc(size); ctypes.memset(block, 1, size); libc.free(block)
    print(malloc_defaults.applied(), faults() - before)
""")


@pytest.mark.skipif(not GLIBC or not os.path.exists("/proc/self/stat"),
                    reason="needs Linux with glibc (mallopt and /proc)")
@pytest.mark.parametrize("declined", [False, True])
def test_a_large_block_is_reused_without_page_faults(declined):
  """The point of the options: a freed 64 MiB block comes back without faulting its pages in
  again (16,384 pages of 4 KiB when glibc unmaps it on free)."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD", "JAX_PLATFORMS"))}
  env["JAX_PLATFORMS"] = "cpu"
  if declined:
    env["UNET_JAX_MALLOC_DEFAULTS"] = "0"
  out = subprocess.run([sys.executable, "-c", _FAULTS], env=env, capture_output=True, text=True,
                       check=True).stdout.split("]")
  applied, faults = out[0] + "]", int(out[1])
  if declined:
    assert applied == "[]" and faults > 1000
  else:
    assert "M_MMAP_MAX" in applied and faults < 100


def test_suspended_restores_glibc_values_inside_and_the_options_after(fresh):
  malloc_defaults.apply()
  del fresh.calls[:]
  with malloc_defaults.suspended():
    inside = list(fresh.calls)
  options = malloc_defaults.OPTIONS
  assert inside == [(options[name][0], malloc_defaults.GLIBC_DEFAULTS[name]) for name in options]
  assert fresh.calls[len(inside):] == [(param, value) for param, value, *_ in options.values()]


def test_suspended_does_nothing_when_nothing_was_set(fresh):
  with malloc_defaults.suspended():
    pass
  assert fresh.calls == []
