"""The part III examples' claims (word vectors, GAN, DQN, transfer learning), and the patterns they
rest on (models over shared parameters, a copied target network, frozen parameters), checked on
the examples' own functions with shorter runs where the full one takes long."""

from __future__ import annotations

import numpy as np
import pytest
from examples_loader import load_example


def host(model) -> dict[str, np.ndarray]:
    return {name: np.array(model.backend.to_numpy(value)) for name, value in model.parameters().items()}


# ------------------------------------------------------------------------------- word vectors

@pytest.fixture(scope="module")
def words():
    example = load_example("word_vectors")
    ids, vocabulary = example.corpus(300_000)  # the example's own corpus
    return example, ids, vocabulary


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["cbow", "skip-gram"])
def test_word_vectors_answer_capital_analogies_far_above_random_vectors(words, architecture):
    example, ids, vocabulary = words
    vectors, losses = example.train(architecture, ids, len(vocabulary), epochs=3)
    assert losses[-1] < losses[0]
    random = np.random.default_rng(0).standard_normal(vectors.shape)
    baseline = example.analogy_accuracy(random, vocabulary, "capital")
    accuracy = example.analogy_accuracy(vectors, vocabulary, "capital")
    assert baseline < 0.1
    assert accuracy >= 0.8, accuracy
    # a colour's nearest words are colours: the words that share its contexts
    assert set(example.neighbours(vectors, vocabulary, "red", k=3)) <= set(example.COLOURS)


def test_word_vector_analogy_finds_a_planted_offset(words):
    # vectors built so that capital = country + one offset, with countries of one length and the
    # offset orthogonal to them (so that cosine similarity keeps it): every analogy comes out
    # right, and breaking the offset for one country costs the questions that involve it
    example, _, vocabulary = words
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((len(vocabulary), 16))
    offset = np.zeros(16)
    offset[0] = 3.0
    for country, capital, *_ in example.COUNTRIES:
        v = rng.standard_normal(16)
        v[0] = 0
        vectors[vocabulary.index(country)] = v / np.linalg.norm(v)
        vectors[vocabulary.index(capital)] = v / np.linalg.norm(v) + offset
    assert example.analogy_accuracy(vectors, vocabulary, "capital") == 1.0
    vectors[vocabulary.index("paris")] = rng.standard_normal(16)
    pairs = len(example.COUNTRIES) * (len(example.COUNTRIES) - 1)
    broken = 2 * (len(example.COUNTRIES) - 1)  # france as the first or the second country
    assert example.analogy_accuracy(vectors, vocabulary, "capital") <= (pairs - broken + 2) / pairs


# ------------------------------------------------------------------------------------- GAN

def test_gan_generator_trains_through_the_shared_frozen_discriminator():
    gan = load_example("gan").GAN(data_dim=2, noise_dim=2, hidden=(16,), seed=0)
    shared = gan.discriminator.parameters()
    # the same arrays, not copies
    assert all(gan.generator.parameters()[name] is array for name, array in shared.items())
    assert gan.generator.frozen == frozenset(shared)
    real = np.random.default_rng(0).standard_normal((32, 2)).astype(np.float32)
    gen_before, disc_before = host(gan.generator), host(gan.discriminator)
    gan.generator.forward({"z": gan.noise(32), "y": np.ones((32, 1), np.float32)})
    gan.generator.backward()
    grads = gan.generator.gradients()
    # the gradient reaches the generator through the discriminator, and only the generator's
    # parameters get one
    assert set(grads) == {n for n in gen_before if n.startswith("gen/")}
    assert all(np.abs(g).max() > 0 for g in grads.values())
    gan.generator.step()
    after = host(gan.generator)
    for name in disc_before:
        np.testing.assert_array_equal(after[name], disc_before[name], err_msg=name)
    assert all(not np.array_equal(after[n], gen_before[n]) for n in grads)
    # the discriminator's step moves the arrays the generator model reads
    gan.step(real)
    assert any(not np.array_equal(gan.generator.parameters()[n], disc_before[n]) for n in disc_before)


def test_gan_measures_see_modes_and_distances():
    example = load_example("gan")
    rng = np.random.default_rng(0)
    data = example.ring_samples(1000, rng)
    modes, near, shares = example.ring_coverage(data)
    assert modes == 8 and near > 0.97 and abs(shares.sum() - near) < 1e-9
    collapsed = example.ring_centres()[[0]] + 0.01 * rng.standard_normal((1000, 2))
    assert example.ring_coverage(collapsed)[0] == 1
    held_out = example.ring_samples(1000, rng)
    assert example.mmd(data, held_out, (0.1, 0.5)) < 0.1 * example.mmd(collapsed, held_out, (0.1, 0.5))


@pytest.mark.slow
def test_gan_on_the_ring_covers_all_eight_modes_and_mmd_falls():
    result = load_example("gan").ring(steps=RING_STEPS, snapshots=(), every=RING_STEPS // 4, seed=RING_SEED)
    curve = result["curve"]
    assert curve[-1]["modes"] == 8, curve
    assert curve[-1]["mmd"] < 0.25 * result["start_mmd"]
    assert curve[-1]["mmd"] < curve[0]["mmd"]


RING_STEPS, RING_SEED = 4000, 1


# ------------------------------------------------------------------------------------- DQN

def test_dqn_target_network_is_a_copy_that_waits_k_updates():
    example = load_example("dqn_maze")
    settings = example.Settings(replay=True, target_every=3, clip_rewards=True)
    agent = example.Agent(example.Maze(), settings, seed=0)

    def equal(a, b):
        return a.keys() == b.keys() and all(np.array_equal(a[name], b[name]) for name in a)

    assert equal(host(agent.target), host(agent.online))
    assert all(agent.target.parameters()[n] is not a for n, a in agent.online.parameters().items())
    batch = (np.arange(8), np.zeros(8, int), np.full(8, 20.0), np.arange(8) + 1, np.zeros(8))
    copied = host(agent.target)
    agent.learn(*batch)
    agent.learn(*batch)
    # the online network moved, its target stayed where the last copy put it
    assert equal(host(agent.target), copied) and not equal(host(agent.online), copied)
    agent.learn(*batch)  # the third update refreshes the copy
    assert equal(host(agent.target), host(agent.online))


def test_maze_rewards_and_shortest_path():
    example = load_example("dqn_maze")
    maze = example.Maze()
    assert maze.shortest_path() == 12
    start = maze.index(maze.start)
    assert maze.step(start, 0) == (start, example.STEP_REWARD, False)  # off the grid: stays
    assert maze.step(start, 3) == (start + 1, example.STEP_REWARD, False)
    before_goal = maze.index((maze.goal[0], maze.goal[1] - 1))
    assert maze.step(before_goal, 3) == (maze.index(maze.goal), example.GOAL_REWARD, True)


@pytest.mark.slow
def test_dqn_settles_on_the_shortest_path_while_naive_q_learning_oscillates():
    # seed 0 of the example's five, both learners with the example's settings
    example = load_example("dqn_maze")
    results = example.compare(seeds=(0,))
    optimal = example.Maze().shortest_path()
    dqn, naive = results["DQN"][0], results["naive"][0]
    half = len(dqn["curve"]) // 2
    assert dqn["curve"][half:] == [optimal] * (len(dqn["curve"]) - half), dqn["curve"]
    # the naive learner found the shortest path, then lost it again: its policy oscillates
    assert optimal in naive["curve"][:half + 2] and np.count_nonzero(np.diff(naive["curve"][half:])) >= 2
    assert np.mean(naive["churn"][half:]) > 2 * np.mean(dqn["churn"][half:])


# --------------------------------------------------------------------------- transfer learning

@pytest.mark.slow
def test_pretrained_features_beat_random_ones_but_not_the_network_trained_from_scratch():
    # three of the example's five draws of 25 labeled images
    result = load_example("transfer_learning").main(draws=3, images=None)
    assert result["transfer"] > result["random features"] + 0.01
    # what the example reports: on 8x8 digits the small CNN trained from scratch on the same 25
    # images does better than frozen features learnt on the other five digits
    assert result["scratch"] > result["transfer"]
    assert min(result[k] for k in ("transfer", "random features", "fine-tuned", "scratch")) > 0.75


def test_transfer_trains_only_the_new_layer():
    example = load_example("transfer_learning")
    source, target = example.split_digits()
    assert set(np.unique(source["y"])) == set(np.unique(target["y"])) == set(range(5))
    train, test = example.few_labels(target, per_class=2, draw=0)
    assert np.bincount(train["y"]).tolist() == [2] * 5
    assert len(train["y"]) + len(test["y"]) == len(target["y"])
    features = {name: value + 0.5 for name, value in host(example.compile_cnn()).items()
                if name.split("/")[0] in example.FEATURE_LAYERS}
    model = example.compile_cnn(initial_values=features, seed=1)
    model.freeze(*example.FEATURE_LAYERS)
    model.fit(train, epochs=3, batch_size=10, verbose=0, monitor=False)
    after = host(model)
    for name, value in features.items():
        np.testing.assert_array_equal(after[name], value.astype(np.float32), err_msg=name)
    assert model.trainable_parameters() == ["out/W", "out/b"]
