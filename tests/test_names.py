"""One meaning per config name across methods (renamed settings still read from stored configs), typed
optimiser groups, and the random-init label shown as it is."""

from __future__ import annotations

import pytest
import torch

from selectune.errors import SelectuneError
from selectune.methods import method_config
from selectune.methods.base import ParamGroup

from conftest import TINY, compose_run, run_cli


def test_old_names_read_as_the_new_ones():
    """SPT's σ divisor was `alpha` (LoRA's scale elsewhere); diff pruning's parameter suffixes were `targets`
    (module suffixes elsewhere). Stored configs with the old names read as before."""
    assert method_config({"name": "spt_lora", "alpha": 4.0}).sigma_divisor == 4.0
    assert method_config({"name": "spt_adapter"}).sigma_divisor == 10.0
    assert method_config({"name": "udiff", "targets": ["bias"]}).target_params == ["bias"]
    assert method_config({"name": "lora", "alpha": 8.0}).alpha == 8.0  # LoRA's own alpha is untouched
    with pytest.raises(SelectuneError, match=r"method.sigma_divisor=0.0: must be positive"):
        method_config({"name": "spt_lora", "alpha": 0.0})


def test_old_and_new_name_together_are_refused_in_one_line(data_env, tmp_path):
    """The recipe states sigma_divisor; the old name added beside it is refused (a plain `method.alpha=4` is an
    unknown key of the recipe, as any misspelt key)."""
    result = run_cli("validate", "glue/rte_spt_lora", *TINY, "+method.alpha=4", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert lines == ["selectune: error: method.alpha and method.sigma_divisor both given: alpha is the old name of "
                     "sigma_divisor (method spt_lora)"], result.stderr


def test_a_misspelt_optimiser_group_key_fails_instead_of_being_ignored(data_env, tmp_path, monkeypatch):
    with pytest.raises(SelectuneError, match="parameter group 'x' has unknown key 'constnat'"):
        ParamGroup.of({"params": [], "lr": 1.0, "weight_decay": 0.0, "name": "x", "constnat": True}, "m")
    with pytest.raises(TypeError):
        ParamGroup([], 1.0, 0.0, "x", constnat=True)  # type: ignore[call-arg]
    from selectune.commands import train
    from selectune.methods.lora import LoRA

    original = LoRA.param_groups

    def misspelt(self, lr, weight_decay):
        groups = original(self, lr, weight_decay)
        groups[0]["windows"] = (0, 2)
        return groups

    monkeypatch.setattr(LoRA, "param_groups", misspelt)
    with pytest.raises(SelectuneError, match="method lora: parameter group 'lora' has unknown key 'windows'"):
        train(compose_run("glue/rte_lora", "trainer.max_steps=1"), tmp_path / "run")
    weight = torch.nn.Parameter(torch.ones(1))
    group = torch.optim.AdamW([ParamGroup([weight], 0.1, 0.0, "g", clip="w").as_dict()]).param_groups[0]
    assert group["params"][0] is weight and group["clip"] == "w" and group["window"] is None


def test_the_random_init_label_is_printed_as_it_is(data_env, tmp_path):
    result = run_cli("train", "recipe=glue/rte_bitfit", *TINY, "trainer.max_steps=1", "task.max_train_examples=8",
                     "task.max_eval_examples=8", f"out_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "[random init: num_hidden_layers=2, hidden_size=64" in " ".join(result.stderr.split())
