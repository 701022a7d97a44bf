"""The nnUNet_kd_* budget variables: good values set the trainer's budget; a bad one stops nnUNetv2_train with
one ``error:`` line naming the variable, before nnU-Net creates the fold folder and its training log."""
from __future__ import annotations

import types

import pytest

from nnunet_kd.training import budget

#: A fold no other test trains, so the fold folder is absent unless this test's command made it.
FOLD = "3"


def test_good_values_set_the_budget_and_empty_means_unset(monkeypatch):
    for name in budget.BUDGET_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("nnUNet_kd_num_epochs", "3")
    monkeypatch.setenv("nnUNet_kd_iterations_per_epoch", "")
    monkeypatch.setenv("nnUNet_kd_save_every", "1")
    trainer = types.SimpleNamespace(num_epochs=1000, num_iterations_per_epoch=250, save_every=50)
    budget.check_budget_environment()
    budget.apply_budget_overrides(trainer)
    assert (trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.save_every) == (3, 250, 1)


@pytest.mark.parametrize("name", sorted(budget.BUDGET_ENV))
@pytest.mark.parametrize("value", ["0", "-2", "abc", "1.5"])
def test_a_bad_value_is_one_error_line_naming_the_variable(monkeypatch, capsys, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exc:
        budget.check_budget_environment()
    assert exc.value.code == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: environment variable {name}={value!r}")
    assert "at least 1" in err[0]
    with pytest.raises(ValueError, match=name):  # in-process callers get an exception, not an exit
        budget.apply_budget_overrides(types.SimpleNamespace())


@pytest.mark.parametrize("trainer,value", [("nnUNetTrainerBudget", "0"), ("nnUNetTrainerBudget", "abc"),
                                           ("nnUNetTrainerMTCMKD", "abc"), ("nnUNetTrainerMGSD", "0")])
def test_nnunetv2_train_stops_before_the_fold_folder(brats_dataset, bin_path, run_cmd, dataset_id, trainer, value):
    env = dict(brats_dataset["env"], nnUNet_kd_num_epochs=value)
    proc = run_cmd([bin_path("nnUNetv2_train"), str(dataset_id), "3d_fullres", FOLD, "-tr", trainer, "-device", "cpu"],
                   env, check=False, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "nnUNet_kd_num_epochs" in errors[0] and "at least 1" in errors[0], proc.stderr
    assert not (brats_dataset["results"] / f"{trainer}__nnUNetPlans__3d_fullres" / f"fold_{FOLD}").exists()
