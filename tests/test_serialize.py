"""Model files: round trips, transfer by name, and files that are newer, corrupted, truncated,
pickled, or caught mid-save by a kill."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import safetensors.numpy
from killing import REPO, kill_when_ready
from payload import Payload

import graphengine as ge
from graphengine.io import serialize
from graphengine.testing import isolated_plugin_manager

rng = np.random.default_rng(5)


def build(seed: int = 0, head: int = 3, hidden: int = 8, **options):
    g = ge.Graph("net")
    x = g.input("x", (None, 4))
    y = g.input("y", (None,), dtype="int64")
    h = g.activation("relu", g.layer("dense", x, units=hidden, name="fc1"))
    h = g.layer("dropout", g.layer("batch_norm", h, name="bn"), rate=0.2)
    h = h * 0.5 + g.constant(np.linspace(-1, 1, hidden), name="offset")
    out = g.layer("dense", h, units=head, name="head")
    return g.compile(g.loss("softmax_cross_entropy", out, y), seed=seed, **options)


def data(n: int = 60, classes: int = 3) -> dict[str, np.ndarray]:
    x = rng.standard_normal((n, 4)).astype(np.float32)
    return {"x": x, "y": np.digitize(x[:, 0] + x[:, 1], np.linspace(-1, 1, classes - 1))}


def trained(**options):
    model = build(optimizer=ge.optimizer("momentum", lr=0.05), **options)
    model.fit(data(), epochs=2, batch_size=20)
    return model


def test_save_load_round_trip_gives_identical_predictions(tmp_path):
    model = trained(regularizer=ge.L2(1e-3), schedule=ge.StepDecay(0.5, every=1), clip_norm=1.0)
    model.freeze("fc1/")
    path = tmp_path / "model.safetensors"
    model.save(path)
    loaded = ge.load(path)
    test = data(30)
    assert np.array_equal(loaded.predict(test), model.predict(test))
    assert np.allclose(loaded.predict(test).sum(axis=1), 1)  # the loss's link (softmax) is back
    assert list(loaded.graph.nodes) == list(model.graph.nodes)
    assert loaded.parameters().keys() == model.parameters().keys()
    assert repr(loaded.optimizer) == repr(model.optimizer)
    assert loaded.frozen == {"fc1/W", "fc1/b"}
    assert [repr(h) for h in loaded.gradient_transforms] == [repr(h) for h in model.gradient_transforms]
    assert (loaded.epoch, loaded.step_count) == (2, 6)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_explicit_outputs_and_other_backends_round_trip(tmp_path):
    g = ge.Graph("plain")
    x = g.input("x", (None, 3))
    out = g.activation("tanh", g.layer("dense", x, units=2))
    model = g.compile(outputs=[out, x * 2.0])
    path = tmp_path / "plain.safetensors"
    model.save(path, training_state=False)
    feed = {"x": rng.standard_normal((5, 3)).astype(np.float32)}
    for backend in ("numpy", "strict"):
        loaded = ge.load(path, backend=backend)
        for name, value in model.predict(feed).items():
            assert np.array_equal(loaded.predict(feed)[name], value)
    assert serialize.read(path).document["training"] is None


def test_a_newer_format_version_asks_to_upgrade(tmp_path, monkeypatch):
    path = tmp_path / "future.safetensors"
    newer = serialize.FORMAT_VERSION + 1
    monkeypatch.setattr(serialize, "FORMAT_VERSION", newer)
    trained().save(path)
    monkeypatch.undo()
    with pytest.raises(ge.SerializationError, match=rf"format version {newer}.*newer.*pip install -U"):
        ge.load(path)


def test_a_pickle_payload_is_rejected_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    for name, write in {
        "model.pkl": lambda p: p.write_bytes(pickle.dumps(Payload(str(marker)))),
        "model.npz": lambda p: np.savez(p, evil=np.array([Payload(str(marker))], dtype=object)),
    }.items():
        path = tmp_path / name
        write(path)
        with pytest.raises(ge.SerializationError, match="never unpickles"):
            ge.load(path)
        with pytest.raises(ge.SerializationError):
            build().load_weights(path)
    assert not marker.exists()


def test_corrupted_files_are_detected_and_named(tmp_path):
    path = tmp_path / "model.safetensors"
    trained().save(path)
    good = path.read_bytes()
    header_end = 8 + int.from_bytes(good[:8], "little")
    corrupted = {
        "tensor byte": (header_end + 5, r"tensor '.*' does not match its checksum"),
        "last byte": (len(good) - 1, "does not match its checksum"),
        "document": (good.index(b'\\"epoch\\"') + 3, "checksum of its graph"),
    }
    for offset, message in corrupted.values():
        bad = bytearray(good)
        bad[offset] ^= 0x01
        path.write_bytes(bytes(bad))
        with pytest.raises(ge.SerializationError, match=message):
            ge.load(path)


def test_truncated_files_always_raise_serialization_errors(tmp_path):
    path = tmp_path / "model.safetensors"
    trained().save(path)
    good = path.read_bytes()
    for length in sorted({0, 3, 8, 20, len(good) // 2, len(good) - 1,
                          *rng.integers(0, len(good), 20).tolist()}):
        path.write_bytes(good[:length])
        with pytest.raises(ge.SerializationError, match="truncated|corrupted"):
            ge.load(path)


def test_other_files_are_refused_with_a_hint(tmp_path):
    plain = tmp_path / "weights.safetensors"
    safetensors.numpy.save_file({"w": np.zeros(3)}, plain)
    with pytest.raises(ge.SerializationError, match="not a graphengine model file"):
        ge.load(plain)
    with pytest.raises(ge.SerializationError, match="cannot read"):
        ge.load(tmp_path / "missing.safetensors")


def test_load_weights_by_name_reports_missing_unexpected_and_mismatched(tmp_path):
    path = tmp_path / "model.safetensors"
    source = trained()
    source.save(path)
    g = ge.Graph("other")
    x = g.input("x", (None, 4))
    h = g.activation("relu", g.layer("dense", x, units=8, name="fc1"))
    out = g.layer("dense", g.layer("dense", h, units=5, name="head"), units=2, name="extra")
    target = g.compile(outputs=[out])
    before = {n: v.copy() for n, v in target.parameters().items()}
    with pytest.raises(ge.SerializationError, match="strict=False"):
        target.load_weights(path)
    assert all(np.array_equal(v, before[n]) for n, v in target.parameters().items())
    report = target.load_weights(path, strict=False)
    assert report.loaded == ["fc1/W", "fc1/b"]
    assert set(report.missing) == {"extra/W", "extra/b"}
    assert {"bn/gamma", "bn/running_mean"} <= set(report.unexpected)
    assert report.mismatched["head/W"] == ((8, 3), (8, 5))
    assert np.array_equal(target.parameters()["fc1/W"], source.parameters()["fc1/W"])
    assert "missing ['extra/W', 'extra/b']" in str(report)


def test_fine_tuning_a_loaded_model_with_frozen_early_layers(tmp_path):
    path = tmp_path / "base.safetensors"
    trained().save(path)
    model = build(head=2, optimizer=ge.optimizer("momentum", lr=0.05), seed=9)
    report = model.load_weights(path, strict=False)
    assert report.mismatched and "fc1/W" in report.loaded
    assert model.freeze("fc1/", "bn/") == ["fc1/W", "fc1/b", "bn/gamma", "bn/beta",
                                           "bn/running_mean", "bn/running_var"]
    frozen = {n: model.parameters()[n].copy() for n in ("fc1/W", "fc1/b", "bn/gamma")}
    head = model.parameters()["head/W"].copy()
    task = data(80, classes=2)
    history = model.fit(task, epochs=15, batch_size=20)
    assert history["loss"][-1] < 0.7 * history["loss"][0]
    assert all(np.array_equal(model.parameters()[n], v) for n, v in frozen.items())
    assert not np.array_equal(model.parameters()["head/W"], head)


def test_unsaveable_optimizer_and_hooks_are_reported_on_load(tmp_path):
    class Homemade(ge.Optimizer):
        def update(self, xp, param, grad, state, step):
            param -= self.lr * grad

    model = build(optimizer=Homemade(lr=0.1))
    model.gradient_transforms.append(lambda model, grads: None)
    path = tmp_path / "custom.safetensors"
    model.save(path)
    with pytest.warns(UserWarning, match="cannot be saved.*lambda"):
        loaded = ge.load(path)
    assert loaded.optimizer is None
    with pytest.warns(UserWarning):
        assert ge.load(path, optimizer=Homemade(lr=0.1)).optimizer.lr == 0.1


class Double(ge.Layer):
    def build(self, g, x):
        return x * 2.0


class DoublePlugin:
    """A third party's layer, present when a model is saved and missing when it is loaded."""

    @ge.hookimpl
    def graphengine_register_layers(self, register):
        register("double", Double)


def test_a_layer_from_a_missing_plugin_is_named(tmp_path):
    path = tmp_path / "plugin.safetensors"
    with isolated_plugin_manager(DoublePlugin(), entry_points=True):
        g = ge.Graph()
        g.compile(outputs=[g.layer("double", g.input("x", (None, 2)))]).save(path)
    with pytest.raises(ge.SerializationError, match=r"uses layer 'double'.*register the plugin"):
        ge.load(path)


def test_a_file_names_the_distribution_to_install_for_a_missing_plugin(tmp_path):
    path = tmp_path / "plugin.safetensors"
    with isolated_plugin_manager(entry_points=True) as manager:
        manager.register(DoublePlugin(), name="doubler", distribution="double-layers")
        g = ge.Graph()
        g.compile(outputs=[g.layer("double", g.input("x", (None, 2)))]).save(path)
    assert serialize.read(path).document["plugins"]["layers"]["double"] == {
        "plugin": "doubler", "distribution": "double-layers"}
    with pytest.raises(ge.SerializationError,
                       match=r"uses layer 'double', provided by plugin 'doubler'.*"
                             r"pip install double-layers"):
        ge.load(path)


def test_training_state_is_required_to_resume(tmp_path):
    path = tmp_path / "weights-only.safetensors"
    trained().save(path, training_state=False)
    with pytest.raises(ge.SerializationError, match="training_state=False"):
        build().load_weights(path, training_state=True)


CHILD = """
import os, sys, time
sys.path.insert(0, {tests!r})
from test_serialize import build
ready, path = {ready!r}, {path!r}
"""

STALL_MID_SAVE = CHILD + """
def stall(fd):
    open(ready, "w").close()   # the new file is written, not yet renamed: now kill me
    time.sleep(60)

os.fsync = stall
build(seed=1).save(path)
"""

SAVE_FOREVER = CHILD + """
models = [build(seed=0, hidden=256), build(seed=1, hidden=256)]
open(ready, "w").close()
while True:
    for model in models:
        model.save(path)
"""


def child_code(script: str, ready, path) -> str:
    return script.format(tests=str(REPO / "tests"), ready=str(ready), path=str(path))


def test_a_kill_during_save_leaves_the_previous_file_intact(tmp_path):
    path, ready = tmp_path / "model.safetensors", tmp_path / "ready"
    model = build(seed=0)
    model.save(path)
    kill_when_ready(child_code(STALL_MID_SAVE, ready, path), ready)
    leftovers = [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    assert leftovers, "the kill should have caught a half-finished temporary file"
    loaded = ge.load(path)
    feed = data(10)
    assert np.array_equal(loaded.predict(feed), model.predict(feed))
    assert not np.array_equal(build(seed=1).predict(feed), model.predict(feed))


def test_a_kill_at_a_random_moment_of_repeated_saves_leaves_one_whole_model(tmp_path):
    path, ready = tmp_path / "model.safetensors", tmp_path / "ready"
    feed = data(10)
    models = [build(seed=s, hidden=256) for s in (0, 1)]
    models[0].save(path)  # there is a whole file even if the child dies before its first save
    candidates = [model.predict(feed) for model in models]
    kill_when_ready(child_code(SAVE_FOREVER, ready, path), ready, delay=float(rng.uniform(0.2, 0.6)))
    predictions = ge.load(path).predict(feed)
    assert any(np.array_equal(predictions, c) for c in candidates)


def test_every_kind_of_builder_call_round_trips(tmp_path):
    g = ge.Graph("zoo")
    images = g.input("images", (None, 1, 6, 6))
    sequence = g.input("sequence", (None, 5, 3))
    h = g.layer("conv2d", images, filters=2, kernel_size=(3, 3), padding="same")
    h = g.layer("flatten", g.layer("max_pool2d", h, kernel_size=(2, 2)))
    h = g.activation("leaky_relu", g.layer("prelu", h), slope=0.2)
    s = g.layer("lstm", sequence, units=4, return_sequences=True)
    s = s.transpose(0, 2, 1)[:, :, -1].reshape(None, 4)
    joined = ge.concat([g.layer("maxout", h, units=3, pieces=2), s, s.sum(axis=(1,), keepdims=True)])
    out = g.layer("add", joined, joined * g.constant(np.arange(8.0), name="scale")) ** 2.0
    model = g.compile(outputs=[out], seed=3)
    path = tmp_path / "zoo.safetensors"
    model.save(path)
    feed = {"images": rng.standard_normal((2, 1, 6, 6)).astype(np.float32),
            "sequence": rng.standard_normal((2, 5, 3)).astype(np.float32)}
    loaded = ge.load(path)
    # replayed with exactly the same arguments: tuples stay tuples (JSON alone makes lists)
    calls = [[c for c in m.graph.calls if c["call"] != "constant"] for m in (model, loaded)]
    assert calls[0] == calls[1]
    assert [n.op.config() for n in loaded.graph.nodes.values()] == [
        n.op.config() for n in model.graph.nodes.values()]
    assert np.array_equal(loaded.predict(feed), model.predict(feed))


def rewrite(path, change) -> None:
    """Change a model file's document and write it back with valid checksums: what a crafted
    file or a broken writer could produce."""
    file = serialize.read(path)
    change(file.document)
    serialize.atomic_write(path, b"".join(serialize._encode(file.document, file.tensors)))


MALFORMED = {
    "no graph": lambda d: d.pop("graph"),
    "unknown builder call": lambda d: d["graph"]["calls"][0].update(call="teleport"),
    "call without its fields": lambda d: d["graph"]["calls"][3].pop("kind"),
    "config not a dict": lambda d: d["graph"]["calls"][3].update(config=5),
    "nodes differ": lambda d: d["graph"]["calls"].pop(),
    "dangling parameter": lambda d: d["parameters"].update({"fc1/W": "nowhere"}),
    "seed is text": lambda d: d["model"].update(seed="zero"),
    "bad optimizer": lambda d: d["model"].update(optimizer={"name": "sgd", "hyperparameters": 1}),
    "dangling optimizer state": lambda d: d["training"]["optimizer_state"].update(
        {"fc1/W": {"velocity": {"tensor": "nowhere"}}}),
    "unknown hook": lambda d: d["model"]["hooks"].append({"where": "constraints", "class": "os",
                                                         "state": {}}),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_document_with_valid_checksums_is_a_serialization_error(tmp_path, case):
    path = tmp_path / "model.safetensors"
    trained().save(path)
    rewrite(path, MALFORMED[case])
    with pytest.raises(ge.SerializationError):
        ge.load(path)


def test_save_and_resume_on_every_backend(tmp_path, backend):
    model = trained(backend=backend)
    path = tmp_path / "model.safetensors"
    model.save(path)
    loaded = ge.load(path, backend=backend)
    test = data(20)
    assert np.array_equal(loaded.predict(test), model.predict(test))
    more = data()
    for m in (model, loaded):
        m.fit(more, epochs=1, batch_size=20)
    for name, value in model.parameters().items():
        assert np.array_equal(model.backend.to_numpy(value),
                              loaded.backend.to_numpy(loaded.parameters()[name])), name


def test_scalar_constants_keep_their_shape_through_a_file(tmp_path):
    """``3 - x``, ``2 ** x`` and a scalar sum's start are 0-d constants: a file that made them
    1-d changed the graph it rebuilt (a scalar loss became (1,) and could not load)."""
    g = ge.Graph("scalars")
    x = g.input("x", (None, 2))
    h = g.layer("dense", x, units=2)
    loss = sum(((3 - h) ** 2).mean(axis=1).mean() for _ in range(2)) + (2 ** h).mean()
    model = g.compile(loss, outputs=[h], optimizer="sgd")
    model.save(tmp_path / "m.ge")
    loaded = ge.load(tmp_path / "m.ge")
    constants = [n for n, node in g.nodes.items() if node.kind == "constant"]
    assert constants and all(loaded.graph.nodes[n].shape == () for n in constants)
    feeds = {"x": np.ones((3, 2), np.float32)}
    assert loaded.forward(feeds) == model.forward(feeds)
