"""Tests for bptt_jax/_checkpoint.py: the file format, corruption, pruning, typed keys.

Every array has an explicit dtype, so the tests read the same with
``jax_enable_x64`` on or off.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bptt_jax as bj
from bptt_jax import _checkpoint

F32 = np.float32


def leaves(tree):
  return [np.asarray(a) for a in jax.tree_util.tree_leaves(tree)]


def assert_trees_equal(a, b):
  """Same structure, dtypes and bits."""
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(leaves(a), leaves(b), strict=True):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(x.reshape(-1).view(np.uint8), y.reshape(-1).view(np.uint8))


def steps_in(directory):
  return [s for s, _ in _checkpoint.list_checkpoints(str(directory))]


def data_files(path):
  """The files orbax wrote in the checkpoint at ``path``, largest first."""
  files = [os.path.join(base, n) for base, _, names in os.walk(os.path.join(path, "tree"))
           for n in names]
  return sorted(files, key=lambda f: (-os.path.getsize(f), f))


def corrupt(path):
  """Cuts the largest file of the checkpoint at ``path`` in half."""
  target = data_files(path)[0]
  data = open(target, "rb").read()
  open(target, "wb").write(data[: len(data) // 2])


@functools.lru_cache(maxsize=None)
def adam_state():
  """A TrainState after two adam updates (mixed dtypes, an LSTMState carry); built once."""
  rng = np.random.default_rng(3)
  params = {"cell": {"W": rng.normal(size=(2, 3)).astype(F32),
                     "U": rng.normal(size=(3, 3)).astype(np.float16)},
            "step_size": F32(0.1)}
  tx = bj.optimizer(1e-2, max_norm=1.0)
  carry = bj.LSTMState(np.ones((2, 3), F32), np.zeros((2, 3), F32))
  state = bj.TrainState.create(params, tx, carry=carry)
  grads = jax.tree_util.tree_map(lambda p: np.full(np.shape(p), 0.3, np.asarray(p).dtype),
                                 params)
  # Two real updates, so the adam moments and counts are not trivial.
  update = jax.jit(lambda s, g: bj.apply_gradients(tx, s, 1.0, g))
  for _ in range(2):
    state, _ = update(state, grads)
  return state


def test_checkpoint_round_trip_is_bit_identical(tmp_path):
  state = adam_state()
  tree = {"state": state, "epoch": 3, "key": jax.random.key_data(jax.random.key(5))}
  path = bj.save_checkpoint(str(tmp_path), 12, tree)
  assert os.path.basename(path) == "ckpt_000000012"
  template = {"state": bj.TrainState.create(
      jax.tree_util.tree_map(np.zeros_like, state.params), bj.optimizer(1e-2, max_norm=1.0),
      carry=bj.LSTMState(np.zeros((2, 3), F32), np.zeros((2, 3), F32))),
      "epoch": 0, "key": jax.random.key_data(jax.random.key(0))}
  loaded = bj.load_checkpoint(path, template)
  assert isinstance(loaded["state"], bj.TrainState)
  assert isinstance(loaded["state"].carry, bj.LSTMState)
  assert int(loaded["epoch"]) == 3
  assert loaded["state"].params["cell"]["U"].dtype == np.float16
  assert_trees_equal(jax.tree_util.tree_map(np.asarray, loaded["state"]), state)
  np.testing.assert_array_equal(loaded["key"], tree["key"])
  assert os.listdir(tmp_path) == ["ckpt_000000012"]  # no temporary file left


def test_typed_keys_round_trip(tmp_path):
  """Typed keys come back as keys of the same implementation, drawing the same numbers."""
  tree = {"key": jax.random.key(11), "rbg": jax.random.split(jax.random.key(4, impl="rbg"), 3),
          "w": np.arange(3, dtype=F32)}
  path = bj.save_checkpoint(str(tmp_path), 1, tree)
  template = {"key": jax.random.key(0), "rbg": jax.random.split(jax.random.key(0, impl="rbg"), 3),
              "w": np.zeros(3, F32)}
  loaded = bj.load_checkpoint(path, template)
  for name in ("key", "rbg"):
    assert loaded[name].dtype == tree[name].dtype  # key<fry>, key<rbg>
    assert loaded[name].shape == tree[name].shape
    np.testing.assert_array_equal(jax.random.key_data(loaded[name]),
                                  jax.random.key_data(tree[name]))
  draw = jax.jit(lambda k: jax.random.normal(k, (4,), jnp.float32))
  np.testing.assert_array_equal(draw(loaded["key"]), draw(tree["key"]))
  np.testing.assert_array_equal(jax.vmap(draw)(loaded["rbg"]), jax.vmap(draw)(tree["rbg"]))
  assert not np.array_equal(draw(loaded["key"]), draw(template["key"]))
  np.testing.assert_array_equal(loaded["w"], tree["w"])

  # A key of another implementation (other key data shape) does not fit.
  with pytest.raises(bj.CheckpointError, match="does not fit the expected structure"):
    bj.load_checkpoint(path, {**template, "key": jax.random.key(0, impl="rbg")})


@pytest.mark.parametrize("which, cut, match", [
    ("data", 0.5, "checksum mismatch .* cut short or altered"),
    ("data", -1, "checksum mismatch .* cut short or altered"),
    ("data", 0, "checksum mismatch .* cut short or altered"),
    ("manifest", 0.5, "not a bptt_jax checkpoint"),
    ("manifest", 0, "not a bptt_jax checkpoint"),
])
def test_file_cut_short_raises_checkpoint_error(tmp_path, which, cut, match):
  state = adam_state()
  path = bj.save_checkpoint(str(tmp_path), 1, state)
  target = data_files(path)[0] if which == "data" else os.path.join(path, "manifest.json")
  data = open(target, "rb").read()
  n = int(len(data) * cut) if isinstance(cut, float) else (len(data) + cut if cut < 0 else cut)
  with open(target, "wb") as f:
    f.write(data[:n])
  with pytest.raises(bj.CheckpointError, match=match):
    bj.load_checkpoint(path, state)


def test_altered_missing_or_foreign_checkpoint_raises(tmp_path):
  state = adam_state()
  path = bj.save_checkpoint(str(tmp_path), 1, state)
  target = data_files(path)[0]
  data = bytearray(open(target, "rb").read())
  data[-5] ^= 0xFF
  open(target, "wb").write(bytes(data))
  with pytest.raises(bj.CheckpointError, match="checksum mismatch"):
    bj.load_checkpoint(path, state)
  other = bj.save_checkpoint(str(tmp_path), 2, state)
  os.remove(data_files(other)[-1])
  with pytest.raises(bj.CheckpointError, match="is missing"):
    bj.load_checkpoint(other, state)
  good = bj.save_checkpoint(str(tmp_path), 3, state)
  with pytest.raises(bj.CheckpointError, match="does not fit the expected structure"):
    bj.load_checkpoint(good, {"something": np.zeros(3, F32), "else": 1})
  wrong_dtype = state._replace(params={**state.params, "step_size": np.float16(0.1)})
  with pytest.raises(bj.CheckpointError, match=r"leaf .*step_size.* float32\[\].*float16"):
    bj.load_checkpoint(good, wrong_dtype)
  with pytest.raises(bj.CheckpointError, match="not a bptt_jax checkpoint"):
    bj.load_checkpoint(str(tmp_path / "nothing"), state)
  assert issubclass(bj.CheckpointError, ValueError)


def test_restore_latest_skips_a_corrupt_newest(tmp_path):
  d = str(tmp_path)
  for step in (10, 20, 30):
    bj.save_checkpoint(d, step, {"w": np.full(3, step, F32)})
  corrupt(os.path.join(d, "ckpt_000000030"))
  with pytest.warns(RuntimeWarning, match="skipping unreadable checkpoint: .*ckpt_000000030"):
    step, tree = bj.restore_latest(d, {"w": np.zeros(3, F32)})
  assert step == 20
  np.testing.assert_array_equal(tree["w"], np.full(3, 20.0, F32))


def test_restore_latest_without_checkpoints(tmp_path):
  assert bj.restore_latest(str(tmp_path / "missing"), {"w": np.zeros(3, F32)}) is None
  (tmp_path / "notes.txt").write_text("not a checkpoint")
  assert bj.restore_latest(str(tmp_path), {"w": np.zeros(3, F32)}) is None


def test_keep_deletes_old_checkpoints(tmp_path):
  d = str(tmp_path)
  for step in range(1, 6):
    bj.save_checkpoint(d, step, {"w": np.full(2, step, F32)}, keep=2)
  assert sorted(os.listdir(d)) == ["ckpt_000000004", "ckpt_000000005"]
  with pytest.raises(ValueError, match="keep must be >= 1"):
    bj.save_checkpoint(d, 6, {"w": np.zeros(2, F32)}, keep=0)


@pytest.mark.parametrize("keep, left", [(1, [5]), (2, [3, 5]), (4, [1, 2, 3, 5])])
def test_save_never_deletes_what_it_wrote_and_drops_later_steps(tmp_path, keep, left):
  """A corrupt checkpoint at a later step (a run cut off, then resumed from step
  3) is stale: saving step 5 deletes it, keeps step 5 and the newest older ones."""
  d = str(tmp_path)
  for step in (1, 2, 3, 9):
    bj.save_checkpoint(d, step, {"w": np.full(2, step, F32)}, keep=10)
  corrupt(os.path.join(d, "ckpt_000000009"))
  path = bj.save_checkpoint(d, 5, {"w": np.full(2, 5.0, F32)}, keep=keep)
  assert steps_in(d) == left
  np.testing.assert_array_equal(bj.load_checkpoint(path, {"w": np.zeros(2, F32)})["w"],
                                [5.0, 5.0])
  # A valid later checkpoint is just as stale.
  bj.save_checkpoint(d, 7, {"w": np.zeros(2, F32)}, keep=keep)
  bj.save_checkpoint(d, 6, {"w": np.full(2, 6.0, F32)}, keep=keep)
  assert steps_in(d) == (left + [6])[-keep:]
  assert bj.restore_latest(d, {"w": np.zeros(2, F32)})[0] == 6


def test_save_removes_orphaned_temporary_files(tmp_path):
  d = tmp_path / "ckpt"
  bj.save_checkpoint(str(d), 1, {"w": np.zeros(2, F32)})
  (d / ".tmp_ckpt_abc123").write_bytes(b"half a checkpoint")  # a crash mid-write
  (d / ".tmp_ckpt_xyz").write_bytes(b"")
  (d / "notes.txt").write_text("kept")
  bj.save_checkpoint(str(d), 2, {"w": np.ones(2, F32)})
  assert sorted(os.listdir(d)) == ["ckpt_000000001", "ckpt_000000002",
                                   "notes.txt"]


def test_clear_removes_checkpoints_and_temporaries(tmp_path):
  d = tmp_path / "ckpt"
  for step in (4, 8, 12):
    bj.save_checkpoint(str(d), step, {"w": np.zeros(2, F32)})
  (d / ".tmp_ckpt_abc123").write_bytes(b"half a checkpoint")
  (d / "notes.txt").write_text("kept")
  assert _checkpoint.clear(str(d)) == 3
  assert os.listdir(d) == ["notes.txt"]
  assert _checkpoint.clear(str(d)) == 0
  assert _checkpoint.clear(str(tmp_path / "missing")) == 0
