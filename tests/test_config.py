"""Config loading, overrides and validation errors (issue 2, Config); config.py as a leaf
with the package's checks in effjax/checks.py (issue 12)."""

import ast
import glob
import json
import os

import pytest

from effjax import checks
from effjax import config as C
from effjax.parallel import sharding
from tests.conftest import REPO, TINY, run_module


def test_overrides_set_typed_values():
  cfg, _ = C.load(["--config=" + TINY, "--config.train.steps=7", "--config.train.lr", "1e-3",
                   "--config.model.tie_embeddings=true", "--config.train.profile_steps=2,4"])
  assert cfg.train.steps == 7 and isinstance(cfg.train.steps, int)
  assert cfg.train.lr == 1e-3
  assert cfg.model.tie_embeddings is True
  assert cfg.train.profile_steps == (2, 4)
  assert cfg.model.d_model == 32  # from the file


def test_unknown_key_suggests_closest():
  with pytest.raises(C.ConfigError) as e:
    C.load(["--config.train.setps=5"])
  assert "train.setps" in str(e.value) and "train.steps" in str(e.value)
  with pytest.raises(C.ConfigError) as e:
    C.load(["--config.modle.d_model=5"])
  assert "model.d_model" in str(e.value)


def test_wrong_type_names_key():
  with pytest.raises(C.ConfigError, match="train.batch_size"):
    C.load(["--config.train.batch_size=abc"])
  with pytest.raises(C.ConfigError, match="model.tie_embeddings"):
    C.load(["--config.model.tie_embeddings=maybe"])


def test_bad_choice_lists_valid_choices():
  with pytest.raises(C.ConfigError) as e:
    C.load(["--config.model.attention.score=sparsemax"])
  assert "softmax" in str(e.value) and "lssa" in str(e.value)


@pytest.mark.parametrize("overrides, keys", [
    (["--config.model.d_model=30", "--config.model.n_heads=4"], ["model.d_model", "model.n_heads"]),
    (["--config.model.n_heads=4", "--config.model.n_kv_heads=3"], ["model.n_kv_heads"]),
    (["--config.train.batch_size=10", "--config.train.grad_accum=4"], ["train.grad_accum"]),
    (["--config.data.corpus=text"], ["data.paths"]),
    (["--config.model.moe.num_experts=4", "--config.model.moe.balance=alf+magic"],
     ["model.moe.balance"]),
    (["--config.model.moe.num_experts=4", "--config.model.moe.top_k=5"], ["model.moe.top_k"]),
    (["--config.model.moe.num_experts=4", "--config.model.moe.layers=1,9"], ["model.moe.layers"]),
    (["--config.model.moe.num_experts=4", "--config.model.moe.topk_schedule=4@0.3"],
     ["model.moe.topk_schedule"]),
])
def test_inconsistent_combinations_name_keys(overrides, keys):
  with pytest.raises(C.ConfigError) as e:
    checks.load(overrides)  # section checks (config.py) and the package's (MoE specs)
  for k in keys:
    assert k in str(e.value)


def test_mesh_product_must_match_devices():
  cfg, _ = checks.load(["--config.mesh.fsdp=2", "--config.mesh.data=-1"], num_devices=8)
  assert sharding.resolve_mesh_shape(cfg.mesh, 8) == {"data": 4, "fsdp": 2, "tensor": 1,
                                                      "expert": 1}
  with pytest.raises(C.ConfigError, match="mesh.data x mesh.fsdp"):
    checks.load(["--config.mesh.data=1", "--config.mesh.fsdp=4"], num_devices=8)
  with pytest.raises(C.ConfigError, match="mesh"):
    checks.load(["--config.mesh.fsdp=3"], num_devices=8)


def test_config_file_errors(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("def get_config():\n  return {'train': {'stepz': 3}}\n")
  with pytest.raises(C.ConfigError) as e:
    C.load(["--config=" + str(bad)])
  assert "bad.py" in str(e.value) and "train.steps" in str(e.value)
  with pytest.raises(C.ConfigError, match="not found"):
    C.load(["--config=" + str(tmp_path / "missing.py")])


def test_json_round_trip():
  cfg, _ = C.load(["--config=" + TINY])
  again = C.from_dict(json.loads(C.to_json(cfg)))
  assert again == cfg


def test_cli_config_error_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  proc = run_module(["-m", "effjax.train", "--config=" + TINY, f"--workdir={workdir}",
                     "--config.train.lr=-1"])
  assert proc.returncode == 2
  assert "train.lr" in proc.stderr
  assert not os.path.exists(workdir)
  proc = run_module(["-m", "effjax.train", "--config=" + TINY, f"--workdir={workdir}",
                     "--config.model.n_layer=3"])
  assert proc.returncode == 2 and "model.n_layers" in proc.stderr
  assert not os.path.exists(workdir)


def test_attention_impl_and_log_n_combinations_are_checked():
  """The log-n baseline needs softmax on the XLA path; GPU/TPU kernels need their backend;
  LSSAR's power is positive (masked weights rely on 0**p = 0), in the config and kernels."""
  with pytest.raises(C.ConfigError, match="lssar_p must be > 0"):
    C.load(["--config=" + TINY, "--config.model.attention.lssar_p=0"])
  from pallas_kernels.attention import attention  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="must be > 0"):
    attention(*(jnp.zeros((1, 8, 2, 16)),) * 3, score="lssar", p=0.0)
  with pytest.raises(C.ConfigError, match="score=softmax"):
    C.load(["--config=" + TINY, "--config.model.attention.log_n_scale=true",
            "--config.model.attention.score=lssa"])
  with pytest.raises(C.ConfigError, match="impl auto or xla"):
    C.load(["--config=" + TINY, "--config.model.attention.log_n_scale=true",
            "--config.model.attention.impl=interpret"])
  for impl in ("pallas_gpu", "pallas_mgpu", "pallas_tpu"):
    with pytest.raises(C.ConfigError, match=f"impl={impl} needs a"):
      checks.load(["--config=" + TINY, f"--config.model.attention.impl={impl}"])
  cfg, _ = checks.load(["--config=" + TINY, "--config.model.attention.impl=interpret_mgpu"])
  assert cfg.model.attention.impl == "interpret_mgpu"


def test_kernel_platform_is_the_target_devices():
  """A named kernel is checked against the platform it will run on (compile_check passes
  the topology's), not against this host's backend."""
  cfg = C.apply_overrides(C.Config(), {"model.attention.impl": "pallas_tpu"})
  assert checks.validate(cfg, platform="tpu").model.attention.impl == "pallas_tpu"
  with pytest.raises(C.ConfigError, match="impl=pallas_tpu needs a TPU backend; this is 'gpu'"):
    checks.validate(cfg, platform="gpu")
  cfg = C.apply_overrides(C.Config(), {"model.attention.impl": "pallas_mgpu"})
  assert checks.validate(cfg, platform="gpu").model.attention.impl == "pallas_mgpu"


def _effjax_imports(path):
  """Every module a file imports from effjax or pallas_kernels, function bodies included."""
  found = []
  for node in ast.walk(ast.parse(open(path).read())):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      names = [node.module or ""] if node.level == 0 else ["(relative)"]
    found += [n for n in names if n.split(".")[0] in ("effjax", "pallas_kernels", "(relative)")]
  return found


def test_config_module_is_a_leaf():
  assert all(i.startswith("effjax.config") for f in glob.glob(os.path.join(REPO, "effjax", "config", "*.py")) for i in _effjax_imports(f))
  assert _effjax_imports(os.path.join(REPO, "effjax", "checks.py"))  # the helper sees imports
  assert not hasattr(C, "ROLES") and not hasattr(C, "resolve_mesh_shape")


def test_each_section_checks_itself_and_the_package_checks_the_rest():
  """Section rules run in config.validate (C.load); rules that need the package (roles,
  MoE specs, mesh rules) run in checks.validate, with the same messages as before."""
  with pytest.raises(C.ConfigError, match="model.moe.top_k"):
    C.MoEConfig(num_experts=4, top_k=5).check(C.Config())
  with pytest.raises(C.ConfigError, match="train.grad_accum"):
    C.load(["--config.train.batch_size=10", "--config.train.grad_accum=4"])
  with pytest.raises(C.ConfigError, match="quant.trust"):
    C.load(["--config.quant.method=quest", "--config.quant.trust=0"])
  bad_roles = ["--config.optim.no_decay_roles=vector,bias"]
  C.load(bad_roles)  # roles belong to models/layers.py: not checked by the leaf
  with pytest.raises(C.ConfigError, match=r"optim.no_decay_roles has unknown roles \['bias'\]"):
    checks.load(bad_roles)
  bad_rules = ["--config.mesh.rules=mlp=model"]
  C.load(bad_rules)
  with pytest.raises(C.ConfigError, match="mesh.rules"):
    checks.load(bad_rules)


def test_diff_treats_a_key_missing_from_an_old_config_as_its_default():
  """A config.json written before a key existed resumes when the key stays at its default
  (found when the MoR kv_strategy key stopped every older run from resuming)."""
  import json  # pylint: disable=g-import-not-at-top
  saved = json.loads(C.to_json(C.Config()))
  del saved["model"]["mor"]["kv_strategy"]
  assert C.diff(saved, C.Config()) == {}
  changed = C.apply_overrides(C.Config(),
                                       {"model": {"mor": {"kv_strategy": "shared"}}})
  assert C.diff(saved, changed) == {"model.mor.kv_strategy": ["recursion_wise", "shared"]}
