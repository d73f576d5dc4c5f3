"""Input folders say what they left out: broken links, link loops, directories, other types."""

import os
import pathlib
import subprocess
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

from unet_jax.data import decode, folder, listing
from unet_jax.inference import images

ROOT = pathlib.Path(__file__).parents[1]
SUPPORTED = ", ".join(images.IMAGE_SUFFIXES)


def _png(path: pathlib.Path, value: int = 255) -> pathlib.Path:
  Image.fromarray(np.full((4, 4), value, np.uint8)).save(path)
  return path


def _messy(directory: pathlib.Path) -> pathlib.Path:
  """good.png, a link to it, and one entry of every kind that is left out."""
  directory.mkdir()
  _png(directory / "good.png")
  os.symlink("good.png", directory / "link.png")
  os.symlink("nowhere.png", directory / "broken.png")
  os.symlink("loop.png", directory / "loop.png")
  (directory / "d.png").mkdir()
  (directory / "notes.txt").write_text("not an image")
  _png(directory / ".hidden.png")
  return directory


def _warnings(call):
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    result = call()
  return result, [str(w.message) for w in caught]


def test_list_images_says_in_one_line_what_it_skipped_and_why(tmp_path):
  directory = _messy(tmp_path / "in")
  (found, unsupported), messages = _warnings(lambda: images.list_images(directory))
  assert found == [directory / "good.png", directory / "link.png"]
  assert unsupported == [directory / "notes.txt"]
  assert messages == [
      f"skipped 5 of 7 entries in {directory}: 1 broken symbolic link (broken.png), "
      f"1 symbolic link loop (loop.png), 1 directory (d.png), 1 hidden entry (.hidden.png), "
      f"1 file of an unsupported type (notes.txt; supported: {SUPPORTED})"]


def test_a_clean_folder_gives_no_warning(tmp_path):
  _png(tmp_path / "a.png")
  os.symlink("a.png", tmp_path / "b.png")
  (found, unsupported), messages = _warnings(lambda: images.list_images(tmp_path))
  assert (found, unsupported, messages) == ([tmp_path / "a.png", tmp_path / "b.png"], [], [])


def test_many_skipped_names_are_cut_short(tmp_path):
  _png(tmp_path / "a.png")
  for i in range(7):
    os.symlink(f"missing{i}.png", tmp_path / f"l{i}.png")
  _, messages = _warnings(lambda: images.list_images(tmp_path))
  assert messages == [f"skipped 7 of 8 entries in {tmp_path}: 7 broken symbolic links "
                      f"(l0.png, l1.png, l2.png, l3.png, l4.png … (7 in all))"]


def test_a_folder_with_nothing_readable_is_an_error_naming_why(tmp_path):
  os.symlink("nowhere.png", tmp_path / "broken.png")
  (tmp_path / "d.png").mkdir()
  with pytest.raises(ValueError, match=r"no images .* in .*; it holds: "
                                       r"broken\.png \(broken symbolic link\), "
                                       r"d\.png \(directory\)$"):
    images.list_images(tmp_path)


def test_a_broken_link_or_loop_given_as_the_input_says_so(tmp_path):
  os.symlink("nowhere.png", tmp_path / "broken.png")
  os.symlink("loop.png", tmp_path / "loop.png")
  with pytest.raises(FileNotFoundError, match=r"broken\.png is a symbolic link to nowhere\.png, "
                                              r"which does not exist"):
    images.list_images(tmp_path / "broken.png")
  with pytest.raises(FileNotFoundError, match=r"loop\.png is a symbolic link loop"):
    images.list_images(tmp_path / "loop.png")
  os.symlink(_png(tmp_path / "real.png"), tmp_path / "alias.png")
  assert images.list_images(tmp_path / "alias.png") == ([tmp_path / "alias.png"], [])


def test_a_fifo_is_left_out_and_never_opened(tmp_path):
  _png(tmp_path / "a.png")
  os.mkfifo(tmp_path / "pipe.png")  # opening it would wait for a writer forever
  _, messages = _warnings(lambda: images.list_images(tmp_path))
  assert messages == [f"skipped 1 of 2 entries in {tmp_path}: 1 entry that is not a regular "
                      f"file (pipe.png)"]


def test_the_training_folder_warns_once_for_both_folders_and_links_still_load(tmp_path):
  for sub in ("images", "masks", "store"):
    (tmp_path / sub).mkdir()
  _png(tmp_path / "images" / "a.png", 7)
  os.symlink(_png(tmp_path / "store" / "b.png", 9), tmp_path / "images" / "b.png")
  os.symlink("gone.png", tmp_path / "images" / "c.png")
  (tmp_path / "images" / "d.png").mkdir()
  _png(tmp_path / "images" / "._a.png")  # a copy from macOS leaves these beside each file
  for stem in "ab":
    _png(tmp_path / "masks" / f"{stem}.png", 255)
  (tmp_path / "masks" / "README.txt").write_text("masks: 0 and 255")
  pairs, messages = _warnings(lambda: folder.find_pairs(tmp_path))
  assert [(i.name, m.name) for i, m in pairs] == [("a.png", "a.png"), ("b.png", "b.png")]
  supported = ", ".join(folder.SUFFIXES)
  assert messages == [
      f"skipped 3 of 5 entries in {tmp_path / 'images'}: 1 broken symbolic link (c.png), "
      f"1 directory (d.png), 1 hidden entry (._a.png); skipped 1 of 3 entries in "
      f"{tmp_path / 'masks'}: 1 file of an unsupported type (README.txt; supported: "
      f"{supported})"]
  source = folder.FolderSource(pairs, channels=1, table=decode.class_table((0, 255)))
  np.testing.assert_allclose(source[1]["image"], 9 / 255)
  assert (source[1]["label"] == 1).all()


def test_a_training_folder_of_only_junk_says_what_it_holds(tmp_path):
  (tmp_path / "images").mkdir()
  (tmp_path / "images" / "a.png").mkdir()
  (tmp_path / "masks").mkdir()
  with pytest.raises(ValueError, match=r"images holds no images with a suffix in .*; it holds: "
                                       r"a\.png \(directory\)$"):
    folder.find_pairs(tmp_path)
  os.symlink("elsewhere", tmp_path / "linked")
  with pytest.raises(FileNotFoundError, match=r"linked is a symbolic link to elsewhere, which "
                                              r"does not exist \(expected a folder of images\)"):
    folder.find_pairs(tmp_path, images="linked")


def test_the_warning_reaches_a_command_line_user(tmp_path):
  directory = _messy(tmp_path / "in")
  result = subprocess.run(
      [sys.executable, "-c", "import sys; from unet_jax.inference import images; "
                             "images.list_images(sys.argv[1])", str(directory)],
      capture_output=True, text=True, timeout=60, cwd=ROOT)
  assert result.returncode == 0, result.stderr
  assert f"UserWarning: skipped 5 of 7 entries in {directory}:" in result.stderr


def test_listing_sorts_and_matches_suffixes_in_any_case(tmp_path):
  for name in ("b.PNG", "a.Tif", "c.jpeg"):
    (tmp_path / name).write_bytes(b"")
  found = listing.list_folder(tmp_path, (".png", ".tif"))
  assert [p.name for p in found.files] == ["a.Tif", "b.PNG"]
  assert found.skipped == {"unsupported": ["c.jpeg"]}
