"""The regularization, persistence and autoencoder examples, with their claims checked on
shortened runs (the dropout comparison needs its full run: see docs/training_recipe_regularize.md)."""

from __future__ import annotations

import pytest
from examples_loader import load_example


@pytest.mark.slow
def test_early_stopping_example_restores_the_best_epoch():
    result = load_example("early_stopping").main(max_epochs=40)
    assert result["stopped_epoch"] is not None
    assert result["best_epoch"] == result["best_epoch_in_history"]
    assert result["restored_val_loss"] == pytest.approx(result["min_history_val_loss"], rel=1e-6)
    assert result["test_loss_early"] < result["test_loss_full"]


@pytest.mark.slow
def test_save_load_finetune_example(tmp_path):
    result = load_example("save_load_finetune").main(folder=str(tmp_path), draws=1)
    assert result["prediction_difference"] == 0.0
    assert result["frozen_change"] == 0.0
    assert result["finetuned_accuracy"] > result["scratch_accuracy"]


@pytest.mark.slow
def test_autoencoder_beats_the_linear_code_of_the_same_size(tmp_path):
    result = load_example("autoencoder_digits").main(epochs=60, picture=str(tmp_path / "ae.png"))
    assert result["autoencoder"] < result["PCA 8"] < result["mean image"]
    assert (tmp_path / "ae.png").stat().st_size > 1000
