"""The files of an input folder, and what was left out of it and why.

Training folders (``unet_jax.data.folder``) and the folders given to predict and evaluate
(``unet_jax.inference.images``) are listed the same way: not recursively, following symbolic
links (a link to an image is an image), and leaving out hidden entries (names starting with
a dot), broken links, link loops, directories (even one named ``x.png``), other non-regular
files (pipes, sockets, devices) and files of unsupported types. What was left out is counted
by reason, so that one line can say so (:meth:`Listing.summary`).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import pathlib
import stat
from collections.abc import Callable, Iterable, Sequence

# Reason → (singular, plural), in the order a summary lists them.
REASONS = {
    "broken link": ("broken symbolic link", "broken symbolic links"),
    "link loop": ("symbolic link loop", "symbolic link loops"),
    "directory": ("directory", "directories"),
    "special": ("entry that is not a regular file", "entries that are not regular files"),
    "vanished": ("entry that vanished while listed", "entries that vanished while listed"),
    "hidden": ("hidden entry", "hidden entries"),
    "unsupported": ("file of an unsupported type", "files of unsupported types"),
}


@dataclasses.dataclass
class Listing:
  """``files``: the regular files (or links to them) of ``folder`` with a supported suffix;
  ``skipped``: reason (a key of ``REASONS``) → the names left out for it; both sorted."""
  folder: pathlib.Path
  suffixes: tuple[str, ...]
  files: list[pathlib.Path]
  skipped: dict[str, list[str]]

  @property
  def unsupported(self) -> list[pathlib.Path]:
    """Regular files whose suffix is not supported."""
    return [self.folder / name for name in self.skipped.get("unsupported", [])]

  def summary(self) -> str:
    """One line: how many entries were skipped, by reason, with their names."""
    count = sum(len(names) for names in self.skipped.values())
    return (f"skipped {count} of {count + len(self.files)} entries in {self.folder}: "
            f"{self.reasons()}")

  def reasons(self) -> str:
    """What was skipped, by reason: ``1 directory (d.png), 2 broken symbolic links (…)``."""
    parts = []
    for reason, (one, many) in REASONS.items():
      names = self.skipped.get(reason, [])
      if names:
        supported = f"; supported: {', '.join(self.suffixes)}" if reason == "unsupported" else ""
        parts.append(f"{len(names)} {one if len(names) == 1 else many} "
                     f"({some(names)}{supported})")
    return ", ".join(parts)

  def entries(self, limit: int = 10) -> str:
    """Each skipped entry with its reason, by name: ``d.png (directory), …``."""
    named = sorted((name, REASONS[reason][0]) for reason, names in self.skipped.items()
                   for name in names)
    return some((f"{name} ({why})" for name, why in named), limit)


def list_folder(folder: str | os.PathLike, suffixes: Sequence[str]) -> Listing:
  """The files of ``folder`` whose suffix (in any case) is one of ``suffixes``, and the
  entries skipped (see the module docstring)."""
  folder = pathlib.Path(folder)
  files, skipped = [], {}
  for entry in sorted(folder.iterdir()):
    reason = _reason(entry, suffixes)
    if reason is None:
      files.append(entry)
    else:
      skipped.setdefault(reason, []).append(entry.name)
  return Listing(folder, tuple(suffixes), files, skipped)


def _reason(entry: pathlib.Path, suffixes: Sequence[str]) -> str | None:
  """Why ``entry`` is left out, or ``None`` when it is a file to read."""
  if entry.name.startswith("."):
    return "hidden"
  try:
    mode = entry.stat().st_mode  # follows links
  except FileNotFoundError:
    return "broken link" if entry.is_symlink() else "vanished"
  except OSError as error:
    if error.errno == errno.ELOOP:
      return "link loop"
    raise
  if stat.S_ISDIR(mode):
    return "directory"
  if not stat.S_ISREG(mode):
    return "special"
  return None if entry.suffix.lower() in suffixes else "unsupported"


def missing(path: pathlib.Path) -> str:
  """Why ``path``, which does not exist as far as ``Path.exists`` can tell, cannot be read."""
  if not path.is_symlink():
    return f"{path} does not exist"
  try:
    path.stat()
  except OSError as error:
    if error.errno == errno.ELOOP:
      return f"{path} is a symbolic link loop"
  return f"{path} is a symbolic link to {os.readlink(path)}, which does not exist"


def some(names: Iterable[str], limit: int = 5) -> str:
  """The first ``limit`` of ``names``, and how many there are in all when that is more."""
  names = list(names)
  return "none" if not names else ", ".join(names[:limit]) + (
      f" … ({len(names)} in all)" if len(names) > limit else "")


def require_files(folder: str | os.PathLike, list_files: Callable[[pathlib.Path], Listing], *,
                  what: str) -> Listing:
  """``list_files(folder)``, with an error for a missing folder or one with none of its
  files (``what``: ``"images"``, ``"volumes"``)."""
  folder = pathlib.Path(folder)
  if not folder.is_dir():
    why = missing(folder) if not folder.exists() else f"{folder} is not a folder"
    raise FileNotFoundError(f"{why} (expected a folder of {what})")
  found = list_files(folder)
  if not found.files:
    raise ValueError(f"{folder} holds no {what} with a suffix in {found.suffixes}"
                     f"{f'; it holds: {found.entries()}' if found.skipped else ' (it is empty)'}")
  return found


def by_stem(found: Listing, stem: Callable[[pathlib.Path], str] = lambda path: path.stem
            ) -> dict[str, pathlib.Path]:
  """The files of ``found`` by their stem; an error naming both files when two share one."""
  files: dict[str, pathlib.Path] = {}
  for path in found.files:
    name = stem(path)
    if name in files:
      raise ValueError(f"{found.folder}: {files[name].name} and {path.name} have the same "
                       f"stem; keep one of them")
    files[name] = path
  return files
