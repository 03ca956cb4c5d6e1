"""The regularization, persistence and autoencoder examples, with their claims checked on
shortened runs; the dropout comparison on its full run (docs/training_recipe_regularize.md)."""

from __future__ import annotations

import pytest
from examples_loader import load_example


@pytest.mark.slow
def test_dropout_fits_the_training_set_less_tightly_and_the_test_set_better():
    results = load_example("dropout_digits").main()
    plain, dropout = results["no dropout"], results["dropout"]
    assert dropout["train acc (fit)"] < plain["train acc (fit)"]  # with the masks on
    # in evaluation mode both networks classify every training image: what dropout changes there
    # is the confidence, not the accuracy (the docs say so)
    assert plain["train acc"] == dropout["train acc"] == 1.0
    assert dropout["train loss"] > 2 * plain["train loss"]
    assert dropout["test acc"] > plain["test acc"]
    assert dropout["test loss"] < plain["test loss"]
    wins = sum(d > p for p, d in zip(plain["per seed"], dropout["per seed"]))
    assert wins > len(plain["per seed"]) / 2


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
