"""Preprocessing layers: fitted on training data (host NumPy), applied as graph nodes, saved."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.decomposition import PCA as SklearnPCA

import graphengine as ge

rng = np.random.default_rng(3)


def correlated(n: int = 300, d: int = 5) -> np.ndarray:
    mixing = rng.standard_normal((d, d)) * np.array([3.0, 1.0, 0.5, 0.2, 0.05])[:, None]
    data = rng.standard_normal((n, d)) @ mixing + np.arange(d) * 10
    data[:, -1] = 7.0  # a constant feature, like the blank border pixels of digits
    return data.astype(np.float32)


def transform(kind: str, data: np.ndarray, backend: str = "numpy", **config) -> tuple:
    g = ge.Graph(kind)
    x = g.input("x", (None, data.shape[1]))
    model = g.compile(outputs=[g.layer(kind, x, name="pre", **config)], backend=backend)
    assert model.fit_preprocessing({"x": data}) == ["pre"]
    return model, model.predict({"x": data})


def test_zscore_gives_zero_mean_unit_variance_and_leaves_constant_features_at_zero(backend):
    data = correlated()
    _, out = transform("zscore", data, backend)
    assert np.allclose(out.mean(axis=0), 0, atol=1e-4)
    assert np.allclose(out.std(axis=0)[:-1], 1, atol=1e-4)
    assert np.array_equal(out[:, -1], np.zeros(len(data)))


def test_minmax_maps_the_training_range_to_unit_interval(backend):
    data = correlated()
    _, out = transform("minmax", data, backend)
    assert np.allclose(out.min(axis=0)[:-1], 0, atol=1e-6)
    assert np.allclose(out.max(axis=0)[:-1], 1, atol=1e-6)
    assert np.isfinite(out).all()


def test_mean_subtraction_per_feature_and_global(backend):
    data = correlated()
    _, out = transform("mean_subtraction", data, backend)
    assert np.allclose(out.mean(axis=0), 0, atol=1e-4)
    model, out = transform("mean_subtraction", data, backend, per_feature=False)
    assert model.parameters()["pre/shift"].shape == ()
    assert np.allclose(out, data - data.mean(), atol=1e-4)


def test_pca_matches_sklearn_and_orders_directions_by_variance(backend):
    data = correlated()
    _, out = transform("pca", data, backend, components=3)
    reference = SklearnPCA(3).fit(data.astype(np.float64))
    expected = reference.transform(data.astype(np.float64))
    signs = np.sign((out * expected).sum(axis=0))
    assert np.allclose(out, expected * signs, atol=1e-3)
    covariance = np.cov(out, rowvar=False)
    assert np.allclose(np.diag(covariance), reference.explained_variance_, rtol=1e-4)
    assert np.allclose(covariance - np.diag(np.diag(covariance)), 0, atol=1e-3)


def test_pca_whitening_gives_identity_covariance(backend):
    data = correlated()
    _, out = transform("pca", data, backend, components=4, whiten=True)
    assert np.allclose(np.cov(out, rowvar=False), np.eye(4), atol=1e-3)


def test_chained_layers_fit_in_graph_order():
    data = correlated()
    g = ge.Graph()
    x = g.input("x", (None, 5))
    out = g.layer("pca", g.layer("zscore", x, name="z"), components=2, name="p")
    model = g.compile(outputs=[out])
    assert model.fit_preprocessing({"x": data}) == ["z", "p"]
    standardized = (data - data.mean(0)) / np.where(data.std(0) > 1e-8, data.std(0), 1)
    # the PCA was fitted on the standardized data, so it centers them at ~0
    assert np.allclose(model.parameters()["p/mean"], 0, atol=1e-4)
    reference = SklearnPCA(2).fit(standardized)
    assert np.allclose(np.abs(model.parameters()["p/projection"]),
                       np.abs(reference.components_.T), atol=1e-4)


def classifier(seed: int = 0):
    g = ge.Graph("pre")
    x = g.input("x", (None, 5))
    y = g.input("y", (None,), dtype="int64")
    h = g.layer("pca", g.layer("zscore", x, name="z"), components=3, whiten=True, name="p")
    out = g.layer("dense", h, units=2, name="out")
    return g.compile(g.loss("softmax_cross_entropy", out, y),
                     optimizer=ge.optimizer("sgd", lr=0.1), seed=seed)


def test_fit_fits_preprocessing_once_then_keeps_it_through_training_and_saving(tmp_path):
    data = correlated()
    labels = (data[:, 0] > np.median(data[:, 0])).astype(np.int64)
    model = classifier()
    model.fit({"x": data, "y": labels}, epochs=2, batch_size=50)
    assert model.fitted_layers == {"z", "p"}
    fitted = {n: v.copy() for n, v in model.parameters().items() if n.startswith(("z/", "p/"))}
    assert np.allclose(fitted["z/shift"], data.mean(axis=0), atol=1e-3)
    assert "z/shift" not in model.trainable_parameters()
    # a second fit on other data does not refit: the statistics belong to the model
    model.fit({"x": data[:50] * 2, "y": labels[:50]}, epochs=1, batch_size=50)
    for name, value in fitted.items():
        assert np.array_equal(model.parameters()[name], value)
    path = tmp_path / "pre.safetensors"
    model.save(path)
    loaded = ge.load(path)
    assert loaded.fitted_layers == {"z", "p"}
    loaded.fit({"x": data[:50] * 2, "y": labels[:50]}, epochs=1, batch_size=50)
    assert np.array_equal(loaded.parameters()["z/shift"], fitted["z/shift"])
    assert model.fit_preprocessing({"x": data[:50] * 2}, refit=True) == ["z", "p"]
    assert not np.array_equal(model.parameters()["z/shift"], fitted["z/shift"])


def test_unfitted_normalization_is_the_identity():
    data = correlated()
    g = ge.Graph()
    x = g.input("x", (None, 5))
    model = g.compile(outputs=[g.layer("zscore", x)])
    assert np.array_equal(model.predict({"x": data}), data)


def test_preprocessing_errors_say_what_is_wrong():
    g = ge.Graph()
    x = g.input("x", (None, 4))
    with pytest.raises(ge.ShapeError, match="cannot keep 5 components of 4"):
        g.layer("pca", x, components=5)
    with pytest.raises(ge.GraphBuildError, match="positive int"):
        g.layer("pca", x, components=0)
    with pytest.raises(ge.ShapeError, match="floating-point"):
        g.layer("zscore", g.input("labels", (None, 3), dtype="int64"))
    with pytest.raises(ge.ShapeError, match="flatten first"):
        g.layer("pca", g.input("images", (None, 2, 2)), components=2)
    model = g.compile(outputs=[g.layer("pca", x, components=3)])
    with pytest.raises(ge.DataError, match="at least 3 rows"):
        model.fit_preprocessing({"x": np.ones((2, 4), np.float32)})
