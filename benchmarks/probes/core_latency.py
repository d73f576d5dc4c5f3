r"""How far apart two CPU cores are: the round trip of one cache line between them.

  python benchmarks/core_latency.py              # one figure, in nanoseconds
  python benchmarks/core_latency.py --watch 30   # a figure every half second, for 30 s

Two threads, pinned to two cores, pass a counter back and forth through one cache line, and
the median round trip is printed. Cores that share a last-level cache pass it in tens of
nanoseconds to about 150 ns; cores on different dies or sockets take several hundred. A JAX
step shares its operations' data between its threads far more than PyTorch's does, so it
slows down much more when its cores are far apart: on a virtual machine whose host moves the
virtual CPUs between dies while a process runs, a step's time follows this figure
(``docs/performance.md`` has the measurements). ``compare_pytorch.py`` records it before
every turn, so that each timing carries the placement it ran under.

The probe is a small C program, compiled on first use with the system's C compiler (``$CC``,
else ``cc``/``gcc``/``clang``) into the package's cache directory. Without a compiler, on
systems other than Linux, or with fewer than two CPUs to pin to, ``round_trip_ns`` returns
``None``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from unet_jax.cpu import native

_SOURCE = r"""
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static _Atomic long line __attribute__((aligned(64)));
static _Atomic int done;

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static int pin(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  return pthread_setaffinity_np(pthread_self(), sizeof set, &set);
}

static void* echo(void* cpu) {
  if (pin(*(int*)cpu) != 0) { atomic_store(&done, 2); return NULL; }
  for (long v = 1; !atomic_load(&done); v += 2) {
    while (atomic_load(&line) != v && !atomic_load(&done)) {}
    atomic_store(&line, v + 1);
  }
  return NULL;
}

/* probe CPU_A CPU_B SECONDS: prints one round trip in ns per 2,000 trips, for SECONDS. */
int main(int argc, char** argv) {
  if (argc != 4) return 2;
  int a = atoi(argv[1]), b = atoi(argv[2]);
  double seconds = atof(argv[3]);
  if (pin(a) != 0) return 3;
  pthread_t thread;
  if (pthread_create(&thread, NULL, echo, &b) != 0) return 4;
  long v = 0;
  for (double end = now() + seconds; now() < end && atomic_load(&done) != 2;) {
    double start = now();
    for (int i = 0; i < 2000 && atomic_load(&done) != 2; ++i, v += 2) {
      atomic_store(&line, v + 1);
      while (atomic_load(&line) != v + 2 && atomic_load(&done) != 2) {}
    }
    printf("%.1f\n", (now() - start) / 2000 * 1e9);
  }
  int failed = atomic_load(&done) == 2;
  atomic_store(&done, 1);
  pthread_join(thread, NULL);
  return failed ? 3 : 0;
}
"""


def _compiler() -> str | None:
  for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
    if name and (path := shutil.which(name)):
      return path
  return None


def probe_path() -> str | None:
  """The compiled probe (compiled now if need be), or ``None`` where it cannot be built."""
  compiler = _compiler()
  if compiler is None or not sys.platform.startswith("linux"):
    return None
  key = hashlib.sha256(_SOURCE.encode() + compiler.encode()).hexdigest()[:16]
  path = native.cache_dir() / f"core_latency-{key}"
  if path.exists():
    return str(path)
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
      source = os.path.join(tmp, "probe.c")
      with open(source, "w") as f:
        f.write(_SOURCE)
      built = os.path.join(tmp, "probe")
      result = subprocess.run([compiler, "-O2", "-pthread", source, "-o", built],
                              capture_output=True, text=True, timeout=120)
      if result.returncode != 0:
        return None
      os.replace(built, path)  # atomic: a concurrent process sees all of it or nothing
  except (OSError, subprocess.SubprocessError):
    return None
  return str(path)


def _allowed_cpus() -> list[int]:
  return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def round_trips_ns(seconds: float = 0.1, cpus: tuple[int, int] | None = None) -> list[float]:
  """Round trips (ns) between two cores, one per 2,000 trips, for about ``seconds``.

  ``cpus`` defaults to the first two CPUs this process may run on. Empty where the probe
  cannot run (see the module's docstring).
  """
  if cpus is None:
    allowed = _allowed_cpus()
    if len(allowed) < 2:
      return []
    cpus = (allowed[0], allowed[1])
  path = probe_path()
  if path is None:
    return []
  try:
    result = subprocess.run([path, str(cpus[0]), str(cpus[1]), str(seconds)],
                            capture_output=True, text=True, timeout=seconds + 30)
  except (OSError, subprocess.SubprocessError):
    return []
  if result.returncode != 0:
    return []
  return [float(line) for line in result.stdout.split()]


def round_trip_ns(seconds: float = 0.1, cpus: tuple[int, int] | None = None) -> float | None:
  """The median of ``round_trips_ns``, or ``None`` where the probe cannot run."""
  trips = round_trips_ns(seconds, cpus)
  return statistics.median(trips) if trips else None


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--watch", type=float, default=0.0,
                      help="print a figure every half second for this many seconds")
  parser.add_argument("--cpus", help="two CPU numbers, comma-separated (default: the first "
                      "two this process may use)")
  args = parser.parse_args(argv)
  cpus = None
  if args.cpus:
    try:
      cpus = tuple(int(c) for c in args.cpus.split(","))
    except ValueError:
      cpus = ()
    if len(cpus) != 2:
      raise SystemExit(f"--cpus: expected two CPU numbers like 0,1, got {args.cpus!r}")
    allowed = _allowed_cpus()
    if not set(cpus) <= set(allowed):
      raise SystemExit(f"--cpus: {args.cpus} are not both among the CPUs this process may "
                       f"use: {allowed}")
  end = time.monotonic() + args.watch
  while True:
    trip = round_trip_ns(0.5 if args.watch else 0.2, cpus)
    if trip is None:
      raise SystemExit("the probe cannot run here: it needs Linux, a C compiler and two CPUs "
                       "to pin to")
    print(f"{trip:.0f} ns", flush=True)
    if time.monotonic() >= end:
      return


if __name__ == "__main__":
  main()
