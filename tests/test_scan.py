"""model.scan_layers: the blocks stacked on a leading layer axis and run by one scan (issue 12,
item 1) compute what the loop over distinct blocks computes, train and resume, and the
configurations whose layers differ are refused."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax import checks, models
from effjax import config as C
from effjax.config import ConfigError
from effjax.models.index import get_path, set_path
from effjax.models.stack import stack_layers, unstack_layers
from effjax.quant.export import export
from effjax.train import trainer
from effjax.train.metrics import read_metrics
from effjax.train.spectral import SpectralExtension
from tests.conftest import TINY

SCAN = "--config.model.scan_layers=true"
MOE = ("--config.model.moe.num_experts=4", "--config.model.moe.top_k=2",
       "--config.model.moe.balance=alf+seq_aux")


def _cfg(*overrides):
  return checks.load(["--config=" + TINY, *overrides])[0]


def _pair(*overrides):
  """(loop model, scanned model) of the same config and seed."""
  return models.build(_cfg(*overrides), 257), models.build(_cfg(SCAN, *overrides), 257)


def _max_diff(a, b) -> float:
  return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y))), a, b)))


def test_scanned_init_is_per_layer_and_equals_the_loop_init():
  plain, scan = _pair()
  stacked = scan.initial_params["blocks"]["layers"]
  for path, x in jax.tree_util.tree_flatten_with_path(stacked)[0]:
    spec = get_path(scan.specs["blocks"]["layers"], tuple(k.key for k in path))
    assert spec.axes[0] == "layers" and x.shape[0] == 2 and len(spec.axes) == x.ndim
    if spec.role == "hidden":  # random matrices: each layer drew its own
      assert not np.allclose(x[0], x[1]), jax.tree_util.keystr(path)
  # Blocks are built as the loop builds them, then stacked: the same seed, the same weights.
  assert _max_diff(unstack_layers(scan.initial_params, 2), plain.initial_params) == 0.0
  # Roles unchanged; logical axes those of a layer with "layers" in front.
  is_spec = lambda s: isinstance(s, models.ParamSpec)
  layer0 = jax.tree.leaves(plain.specs["blocks"]["layers"][0], is_leaf=is_spec)
  assert [(s.role, ("layers",) + s.axes) for s in layer0] == [
      (s.role, s.axes) for s in jax.tree.leaves(scan.specs["blocks"]["layers"], is_leaf=is_spec)]


@pytest.mark.parametrize("overrides", [(), ("--config.model.remat=true",), MOE],
                         ids=["dense", "remat", "moe"])
def test_scanned_and_loop_models_give_the_same_logits_aux_and_gradients(overrides):
  plain, scan = _pair(*overrides)
  # Random per-layer weights (not the init), loaded into both layouts.
  keys = iter(jax.random.split(jax.random.PRNGKey(7), 100))
  params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape),
                        scan.initial_params)
  plain_params = unstack_layers(params, 2)
  ids = jax.random.randint(jax.random.PRNGKey(0), (2, 32), 0, 257)
  seg = jnp.asarray([[1] * 12 + [2] * 20] * 2)
  pos = jnp.asarray([list(range(12)) + list(range(20))] * 2)

  def loss(model):
    def f(p, buffers):
      logits, aux = model.apply(p, buffers, ids, positions_BxL=pos, segment_ids_BxL=seg)
      extra = sum(v for k, v in aux.items() if k.startswith("loss/"))
      return jnp.mean(jax.nn.log_softmax(logits)[..., 0]) + extra, (logits, aux)
    return jax.jit(jax.value_and_grad(f, has_aux=True))

  (la, (logits_a, aux_a)), ga = loss(plain)(plain_params, plain.initial_buffers)
  (lb, (logits_b, aux_b)), gb = loss(scan)(params, scan.initial_buffers)
  np.testing.assert_allclose(logits_b, logits_a, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(lb, la, atol=1e-5, rtol=1e-5)
  assert list(aux_b) == list(aux_a)  # per-layer keys, in the loop's order
  for k in aux_a:
    np.testing.assert_allclose(aux_b[k], aux_a[k], atol=1e-5, rtol=1e-5, err_msg=k)
  if overrides == MOE:
    assert "stat/moe_counts/layer1" in aux_a
  assert _max_diff(unstack_layers(gb, 2), ga) < 1e-5


def test_probes_and_index_entries_are_per_layer():
  plain, scan = _pair(*MOE)
  ids = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, 257)
  _, pa = plain.apply(plain.initial_params, plain.initial_buffers, ids, probe=True)
  _, pb = scan.apply(scan.initial_params, scan.initial_buffers, ids, probe=True)
  acts = sorted(k for k in pa if k.startswith("act/"))
  assert "act/residual/layer1" in acts and acts == sorted(k for k in pb if k.startswith("act/"))
  for k in acts:
    np.testing.assert_allclose(pb[k], pa[k], atol=1e-5, rtol=1e-5, err_msg=k)
  # One entry per layer, with the loop's tags in the loop's order; paths into stacked rows.
  ea, eb = plain.index.entries, scan.index.entries
  assert [e.tag for e in eb] == [e.tag for e in ea] and scan.index.stacked
  assert [e.stacked for e in eb if e.tag.kind == "moe"] == [0, 1]
  for a, b in zip(plain.index.of("moe"), scan.index.of("moe")):
    np.testing.assert_array_equal(get_path(scan.initial_params, b.at("router")),
                                  get_path(plain.initial_params, a.at("router")))
  moe1 = scan.index.of("moe")[1]
  buffers = set_path(scan.initial_buffers, moe1.at("bias"), jnp.full((4,), 3.0))
  bias = get_path(buffers, ("blocks", "layers", "ffn", "bias"))
  np.testing.assert_array_equal(bias, [[0.0] * 4, [3.0] * 4])


def test_extension_hooks_update_the_same_state_in_both_layouts():
  """ALF-LB bias updates, QAT oscillation tracking and CGA (in its phase) find their state
  through the index: on the same states they give the same result in both layouts."""
  from effjax.train.moe_extension import MoEExtension
  from effjax.train.quant_extension import QuantExtension
  from effjax.train.state import TrainState
  for overrides, ext in ((MOE, MoEExtension), (("--config.quant.method=statsq",
                                                 "--config.quant.cga_start=0.1"), QuantExtension)):
    cfg_a, cfg_b = _cfg(*overrides), _cfg(SCAN, *overrides)
    plain, scan = models.build(cfg_a, 257), models.build(cfg_b, 257)
    keys = iter(jax.random.split(jax.random.PRNGKey(3), 200))
    noise = lambda tree: jax.tree.map(lambda x: x + 0.01 * jax.random.normal(next(keys), x.shape),
                                      tree)
    p0 = unstack_layers(scan.initial_params, 2)
    states = [(p0, plain.initial_buffers), (noise(p0), plain.initial_buffers)]
    states.append((noise(states[1][0]), states[1][1]))
    aux = {f"stat/moe_counts/layer{i}": jnp.arange(4.0) * (i + 1) for i in (0, 1)}
    ha, hb = ext(cfg_a, plain).hooks(), ext(cfg_b, scan).hooks()
    assert ha and len(ha) == len(hb)
    olda = oldb = None
    for params, buffers in states:
      new_a = TrainState(step=jnp.int32(30), params=params, opt_state=None,
                         buffers=buffers if olda is None else olda.buffers, rng=None)
      new_b = new_a.replace(params=stack_layers(new_a.params), buffers=stack_layers(new_a.buffers))
      olda, oldb = olda or new_a, oldb or new_b
      for fa, fb in zip(ha, hb):
        new_a, new_b = fa(new_a, olda, aux), fb(new_b, oldb, aux)
      assert _max_diff(stack_layers(new_a.params), new_b.params) == 0.0
      assert _max_diff(stack_layers(new_a.buffers), new_b.buffers) == 0.0
      olda, oldb = new_a, new_b
    assert _max_diff(new_b.buffers, scan.initial_buffers) > 0  # the hooks did something


def test_mup_spectral_and_export_read_the_stacked_layout():
  mup = ("--config.model.param=mup", "--config.model.d_model=64", "--config.model.base_width=32")
  plain, scan = _pair(*mup)
  specs_a = plain.specs["blocks"]["layers"]
  for i in (0, 1):  # fan-in / fan-out ratios from the trailing dims; stacked vectors stay 1
    mults = lambda tree: jax.tree.map(lambda s: (s.fan_in_mult, s.fan_out_mult), tree,
                                      is_leaf=lambda s: isinstance(s, models.ParamSpec))
    assert mults(specs_a[i]) == mults(scan.specs["blocks"]["layers"])
  assert _max_diff(unstack_layers(scan.initial_params, 2), plain.initial_params) == 0.0
  on_eval = lambda model: SpectralExtension(None, model).on_eval(
      types.SimpleNamespace(params=model.initial_params), {})
  sa, sb = on_eval(plain), on_eval(scan)
  assert sorted(sa) == sorted(sb) and "spec/sigma_max/q" in sa
  for k in sa:
    assert sb[k] == pytest.approx(sa[k], rel=1e-5), k
  qat = models.build(_cfg(SCAN, "--config.quant.method=quest"), 257)
  with pytest.raises(ValueError, match="scan_layers"):
    export(_cfg(SCAN, "--config.quant.method=quest"), qat.initial_params, "/dev/null", qat.index)


def test_scan_layers_trains_and_resumes_exactly(tmp_path):
  overrides = (SCAN, "--config.train.steps=40", "--config.train.log_every=1",
               "--config.train.checkpoint_every=100", "--config.train.eval_every=20",
               "--config.train.grad_accum=2", "--config.train.log_spectral=true")
  data = trainer.load_data(_cfg())
  straight, chunked = str(tmp_path / "straight"), str(tmp_path / "chunked")
  assert trainer.train(_cfg(*overrides), straight, data=data, quiet=True).exit_code == 0
  r1 = trainer.train(_cfg(*overrides), chunked, data=data, quiet=True, stop_at=20)
  assert r1.exit_code == trainer.EXIT_INTERRUPTED and r1.step == 20
  r2 = trainer.train(_cfg(*overrides), chunked, data=data, quiet=True)
  assert r2.exit_code == 0 and r2.step == 40
  a, b = read_metrics(straight + "/metrics.jsonl"), read_metrics(chunked + "/metrics.jsonl")
  losses = [r["train/loss"] for r in a if "train/loss" in r]
  assert losses[0] > 4.5 and losses[-1] < 3.8, (losses[0], losses[-1])  # ln(257) = 5.55
  keys = ("train/loss", "train/grad_norm", "train/param_norm", "eval/loss")
  pick = lambda rows: {(r["step"], k): r[k] for r in rows for k in keys if k in r}
  assert len(pick(a)) >= 40 * 3 + 2
  assert pick(a) == pick(b)  # bit-for-bit


@pytest.mark.parametrize("overrides,key", [
    (("--config.model.moe.layers=1:",), "model.moe.layers"),
    (("--config.model.moe.topk_schedule=0.5:4:0.3",), "model.moe.topk_schedule")])
def test_config_check_refuses_layers_that_differ(overrides, key):
  with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
    _cfg(SCAN, "--config.model.moe.num_experts=4", *overrides)
  assert "model.scan_layers" in str(err.value)
  _cfg(SCAN, "--config.model.moe.num_experts=4", "--config.model.moe.layers=0:2")  # all: fine
  # Without the package checks (config.py alone), the builder still refuses differing blocks.
  unchecked, _ = C.load(["--config=" + TINY, SCAN, "--config.model.moe.num_experts=4",
                         "--config.model.moe.layers=1"])
  with pytest.raises(ValueError, match="identical layers"):
    models.build(unchecked, 257)
