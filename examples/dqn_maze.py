"""Deep Q-learning in a maze (the notes' 走迷宮), and why DQN needs its "stable solutions".

An agent starts in the top-left corner of a 7x7 maze and must reach the bottom-right corner.
Each move costs -1, walking into a wall costs -1 and leaves it where it is, reaching the goal pays
+20 and ends the episode (so do 60 moves). A Q-network (one-hot cell -> 64 ReLU -> 4 action
values) learns Q(s, a) from the Bellman equation ``Q(s, a) = r + gamma * max_a' Q(s', a')`` in
two ways, with the same network, optimizer, learning rate, exploration and number of moves:

- naive online Q-learning: one update per move, on that move alone (successive samples are
  correlated), bootstrapping from the network being trained, with the raw rewards;
- DQN: experience replay (updates on random minibatches of past moves), a frozen target network
  (a second model compiled from the same graph, whose parameters are copied from the online one
  every K updates), and rewards clipped to [-1, 1].

After every 200 moves the greedy policy is followed from the start: its path length (the
shortest path has 12 moves; 60 means it never arrives) is the learning curve. Several seeds of
each; the curves and the learned paths go to docs/images/dqn_curves.png and dqn_paths.png.

    .venv/bin/python examples/dqn_maze.py
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from threadpoolctl import threadpool_limits

import graphengine as ge

IMAGES = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "docs", "images")

# S: start, G: goal, #: wall
MAZE = (
    "S..#...",
    ".#.#.#.",
    ".#...#.",
    ".####..",
    "...#.#.",
    "#.##.#.",
    "......G",
)
MOVES = ((-1, 0), (1, 0), (0, -1), (0, 1))  # up, down, left, right
STEP_REWARD, GOAL_REWARD = -1.0, 20.0
MAX_MOVES = 60
GAMMA = 0.95


class Maze:
    """The environment: cells are numbered row by row; ``step`` returns (next cell, reward, done)."""

    def __init__(self, layout: Sequence[str] = MAZE) -> None:
        self.rows, self.cols = len(layout), len(layout[0])
        self.walls = {(r, c) for r, line in enumerate(layout) for c, ch in enumerate(line) if ch == "#"}
        self.start = next((r, c) for r, line in enumerate(layout) for c, ch in enumerate(line) if ch == "S")
        self.goal = next((r, c) for r, line in enumerate(layout) for c, ch in enumerate(line) if ch == "G")
        self.cells = self.rows * self.cols

    def index(self, cell: tuple[int, int]) -> int:
        return cell[0] * self.cols + cell[1]

    def cell(self, index: int) -> tuple[int, int]:
        return divmod(index, self.cols)

    def step(self, state: int, action: int) -> tuple[int, float, bool]:
        r, c = self.cell(state)
        nr, nc = r + MOVES[action][0], c + MOVES[action][1]
        if not (0 <= nr < self.rows and 0 <= nc < self.cols) or (nr, nc) in self.walls:
            return state, STEP_REWARD, False
        if (nr, nc) == self.goal:
            return self.index((nr, nc)), GOAL_REWARD, True
        return self.index((nr, nc)), STEP_REWARD, False

    def shortest_path(self) -> int:
        """Breadth-first search: the optimal number of moves from start to goal."""
        seen, frontier = {self.start: 0}, deque([self.start])
        while frontier:
            cell = frontier.popleft()
            for dr, dc in MOVES:
                nxt = (cell[0] + dr, cell[1] + dc)
                if (0 <= nxt[0] < self.rows and 0 <= nxt[1] < self.cols and nxt not in self.walls
                        and nxt not in seen):
                    seen[nxt] = seen[cell] + 1
                    frontier.append(nxt)
        return seen[self.goal]


def q_graph(cells: int, hidden: int = 64) -> tuple[ge.Graph, ge.Tensor, ge.Tensor]:
    """The Q-network and its training loss: the squared error of Q(s, a) for the action taken
    (picked out of the 4 values by a one-hot mask) against the Bellman target."""
    g = ge.Graph("q_network")
    state = g.input("s", (None,), dtype="int64")
    h = g.activation("relu", g.layer("dense", g.layer("one_hot", state, depth=cells), units=hidden,
                                     init="he", name="fc1"))
    q = g.layer("dense", h, units=len(MOVES), name="q")
    taken = (q * g.input("action_mask", (None, len(MOVES)))).sum(axis=1)
    return g, q, g.loss("mse", taken, g.input("target", (None,)))


class Settings(NamedTuple):
    replay: bool  # minibatches from a replay memory, or the last move alone
    target_every: int | None  # copy to a frozen target network every K updates; None: no target net
    clip_rewards: bool
    moves: int = 4000
    lr: float = 1e-3
    batch: int = 32
    memory: int = 5000
    explore_until: int = 2000  # epsilon falls from 1 to 0.05 over these moves
    evaluate_every: int = 200


DQN = Settings(replay=True, target_every=100, clip_rewards=True)
NAIVE = Settings(replay=False, target_every=None, clip_rewards=False)


class Agent:
    def __init__(self, maze: Maze, settings: Settings, seed: int) -> None:
        self.maze, self.settings = maze, settings
        g, self.q, loss = q_graph(maze.cells)
        self.online = g.compile(loss, outputs=[self.q], optimizer=ge.optimizer("adam", lr=settings.lr),
                                seed=seed)
        # the target network: the same graph compiled again (outputs only, no optimizer), its
        # own arrays, refreshed by copying the online network's values
        self.target = g.compile(outputs=[self.q], seed=seed) if settings.target_every else None
        self.copy_to_target()
        self.updates = 0

    def copy_to_target(self) -> None:
        if self.target is not None:
            to_host = self.online.backend.to_numpy
            self.target.set_parameters({k: to_host(v) for k, v in self.online.parameters().items()})

    def values(self, model: ge.Model, states: np.ndarray) -> np.ndarray:
        return model.run({"s": states}, fetches=[self.q])[self.q.name]

    def learn(self, states, actions, rewards, next_states, done) -> float:
        if self.settings.clip_rewards:
            rewards = np.clip(rewards, -1.0, 1.0)
        bootstrap = self.values(self.target or self.online, next_states).max(axis=1)
        targets = (rewards + GAMMA * bootstrap * (1.0 - done)).astype(np.float32)
        mask = np.eye(len(MOVES), dtype=np.float32)[actions]
        loss = self.online.train_step({"s": states, "action_mask": mask, "target": targets})
        self.updates += 1
        if self.target is not None and self.updates % self.settings.target_every == 0:
            self.copy_to_target()
        return loss

    def greedy_path(self) -> list[int]:
        """The cells visited following argmax Q from the start, at most MAX_MOVES moves."""
        best = self.values(self.online, np.arange(self.maze.cells)).argmax(axis=1)
        state = self.maze.index(self.maze.start)
        path = [state]
        for _ in range(MAX_MOVES):
            state, _, done = self.maze.step(state, int(best[state]))
            path.append(state)
            if done:
                break
        return path


def path_length(maze: Maze, path: list[int]) -> int:
    """Moves to the goal, or MAX_MOVES when the path never gets there."""
    return len(path) - 1 if path[-1] == maze.index(maze.goal) else MAX_MOVES


def run(settings: Settings, seed: int, maze: Maze | None = None) -> dict:
    """Train one agent; returns its learning curve (greedy path length), its policy churn (the
    share of open cells whose greedy action changed since the last evaluation) and its path."""
    maze = maze or Maze()
    rng = np.random.default_rng(seed)
    agent = Agent(maze, settings, seed)
    memory: deque = deque(maxlen=settings.memory)
    state, moves_in_episode = maze.index(maze.start), 0
    open_cells = np.array([maze.index((r, c)) for r in range(maze.rows) for c in range(maze.cols)
                           if (r, c) not in maze.walls and (r, c) != maze.goal])
    curve, churn, policy = [], [], None
    for move in range(1, settings.moves + 1):
        epsilon = max(0.05, 1.0 - 0.95 * move / settings.explore_until)
        if rng.random() < epsilon:
            action = int(rng.integers(len(MOVES)))
        else:
            action = int(agent.values(agent.online, np.array([state]))[0].argmax())
        next_state, reward, done = maze.step(state, action)
        memory.append((state, action, reward, next_state, float(done)))
        if settings.replay:
            if len(memory) >= settings.batch:
                rows = [memory[i] for i in rng.integers(len(memory), size=settings.batch)]
                agent.learn(*(np.array(column) for column in zip(*rows)))
        else:
            agent.learn(*(np.array([value]) for value in memory[-1]))
        moves_in_episode += 1
        if done or moves_in_episode == MAX_MOVES:
            state, moves_in_episode = maze.index(maze.start), 0
        else:
            state = next_state
        if move % settings.evaluate_every == 0:
            curve.append(path_length(maze, agent.greedy_path()))
            previous, policy = policy, agent.values(agent.online, open_cells).argmax(axis=1)
            churn.append(float(np.mean(policy != previous)) if previous is not None else 1.0)
    return {"curve": curve, "churn": churn, "path": agent.greedy_path()}


def compare(seeds: Sequence[int] = range(5), settings: dict[str, Settings] | None = None) -> dict:
    settings = settings or {"DQN": DQN, "naive": NAIVE}
    # matrices this small keep one core busy: a second BLAS thread only spins against the first
    with threadpool_limits(limits=1, user_api="blas"):
        return {name: [run(s, seed) for seed in seeds] for name, s in settings.items()}


def save_pictures(results: dict, maze: Maze, optimal: int, folder: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colours = {"DQN": "#1f77b4", "naive": "#d62728"}
    every = DQN.evaluate_every
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for k, (name, runs) in enumerate(results.items()):
        x = every * np.arange(1, len(runs[0]["curve"]) + 1)
        for i, r in enumerate(runs):
            # seeds drawn a little apart, so that equal curves stay visible
            axes[0].plot(x, np.array(r["curve"]) + 0.6 * i - 1.5 * k, c=colours.get(name), alpha=0.7,
                         lw=1.2, label=f"{name} ({len(runs)} seeds)" if i == 0 else None)
        axes[1].plot(x[1:], np.mean([r["churn"][1:] for r in runs], axis=0), "o-", ms=3,
                     c=colours.get(name), label=f"{name}, mean of {len(runs)} seeds")
    axes[0].axhline(optimal, ls="--", c="k", lw=1, label=f"shortest path ({optimal})")
    axes[0].set_ylabel(f"greedy path length ({MAX_MOVES}: never arrives)")
    axes[1].set_ylabel("cells whose greedy action changed")
    axes[1].set_title(f"policy churn between evaluations {every} moves apart", fontsize=9)
    for ax in axes:
        ax.set_xlabel("moves in the maze")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "dqn_curves.png"), dpi=80)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(results), figsize=(3.3 * len(results), 3.5))
    for ax, (name, runs) in zip(np.atleast_1d(axes), results.items()):
        grid = np.zeros((maze.rows, maze.cols))
        for wall in maze.walls:
            grid[wall] = 1
        ax.imshow(grid, cmap="Greys", vmin=0, vmax=1.5)
        # the seed that ended furthest from the shortest path (the first one if all are equal)
        worst = int(np.argmax([path_length(maze, r["path"]) for r in runs]))
        path = np.array([maze.cell(i) for i in runs[worst]["path"]], dtype=float)
        ax.plot(path[:, 1], path[:, 0], "o-", c=colours.get(name), ms=4)
        ax.text(maze.start[1], maze.start[0], "S", ha="center", va="center", fontsize=12, weight="bold")
        ax.text(maze.goal[1], maze.goal[0], "G", ha="center", va="center", fontsize=12, weight="bold")
        length = path_length(maze, runs[worst]["path"])
        ax.set_title(f"{name}, worst of {len(runs)} seeds: "
                     + (f"{length} moves" if length < MAX_MOVES else "never arrives"), fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "dqn_paths.png"), dpi=80)
    plt.close(fig)


def main(seeds: Sequence[int] = range(5), images: str | None = IMAGES) -> dict:
    maze = Maze()
    optimal = maze.shortest_path()
    start = time.perf_counter()
    results = compare(seeds)
    print(f"maze {maze.rows}x{maze.cols}, shortest path {optimal} moves; {DQN.moves} moves per run, "
          f"{len(seeds)} seeds, {time.perf_counter() - start:.1f} s")
    summary = {}
    for name, runs in results.items():
        finals = [r["curve"][-1] for r in runs]
        optimal_runs = sum(f == optimal for f in finals)
        half = len(runs[0]["curve"]) // 2
        # the notes' "policy may oscillate": how often the greedy path changed, and how much of
        # the policy changed between evaluations, over the second half of training
        changes = float(np.mean([np.count_nonzero(np.diff(r["curve"][half:])) for r in runs]))
        churn = float(np.mean([r["churn"][half:] for r in runs]))
        print(f"{name:>6}: greedy path length every {DQN.evaluate_every} moves, seed 0: "
              f"{' '.join(map(str, runs[0]['curve']))}")
        print(f"{'':>6}  final path length per seed {finals}: shortest on {optimal_runs} of {len(runs)}; "
              f"second half: path length changed {changes:.1f} times, {churn:.1%} of the cells "
              f"changed their greedy action between evaluations")
        summary[name] = {"finals": finals, "optimal_runs": optimal_runs, "changes": changes,
                         "churn": churn}
    if images:
        os.makedirs(images, exist_ok=True)
        save_pictures(results, maze, optimal, images)
    return {"optimal": optimal, "summary": summary, "results": results}


if __name__ == "__main__":
    main()
