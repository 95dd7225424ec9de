"""`cospec-local train-policy`: the CoSpec arbiter, trained by reinforcement learning.

Rollouts are `--mode cospec` generations (greedy decoding) in which every mismatch is arbitrated
STOCHASTICALLY: keep the draft's token with the policy's probability pi(f). A rollout's reward is 1
if the final answer is right, else 0, minus `cost` x target calls per generated token (0 by
default). Policy gradient, loss = - sum over decisions of advantage x log pi(decision | features)
/ number of decisions, one Adam step per batch. Two estimators of a decision's advantage:
- "decision" (the default; per-decision Monte Carlo, as VinePPO): one rollout per problem, then,
  for each of its decisions (at most `branches`, drawn at random), a branch rollout that replays
  the decisions before it, takes the other choice there and samples the rest from the policy. The
  two returns estimate Q(keep) and Q(defer) at that state, so the decision's advantage is
  (1 - pi(a)) (Q(a) - Q(other)): each mismatch gets its own credit, the others' noise cancels.
- "group" (group-relative, as GRPO): G rollouts per problem, each decision weighted by its
  rollout's reward minus the group's mean: every decision of a rollout shares one advantage.
Rollouts decode with a numpy copy of the network (no torch per token). The network is an MLP over
the model-agnostic features (`arbiter.GENERIC_FEATURES`), standardised with statistics of the
first rollouts (baked into the exported graph), plus, with `token_features`, embedding tables for
the token identities (`arbiter.TOKEN_FEATURES`), which bind the policy to the pair's vocabulary.
Each epoch logs the held-out accuracy and target calls per token of the deterministic policy
(threshold 0.5) on validation problems never trained on (and disjoint from the evaluation range)
and saves a checkpoint (resumable); the epoch with the best validation reward (accuracy - cost x
target calls per token: accuracy when the cost is 0) is exported as ONNX with its metadata: schema
version, feature names, vocabulary, threshold, the rule baseline's thresholds and the training
provenance.

Also here: the supervised baseline (labels from oracle branch choices, AutoJudge-style) and the
fixed-threshold rule fitted on training problems, and `run_training`, which runs all three for
`cospec-local train-policy`.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..arbiter import FEATURE_NAMES, GENERIC_FEATURES, SCHEMA_VERSION, TOKEN_FEATURES, ArbitratingVerifier, RulePolicy
from ..config import GenerationConfig
from .testworld.tasks import TASK_STOP, Problem, check, problems

# Problem index ranges of the eval split: evaluation uses 0.., bench 10_000.., training 100_000..,
# held-out validation during training 200_000.. (the train split of the families taught the models).
TRAIN_START, HELD_OUT_START = 100_000, 200_000


@dataclass
class TrainSettings:
    """Everything that determines a training run (stored in the checkpoint and the ONNX metadata)."""

    families: tuple[str, ...] = ("add", "count")
    epochs: int = 12
    batches_per_epoch: int = 4
    problems_per_batch: int = 16
    group_size: int = 8
    hidden: int = 16
    lr: float = 0.03
    cost: float = 0.0
    seed: int = 0
    held_out: int = 100  # per family
    max_tokens: int = 160
    tasks: str | None = None  # a JSONL task file instead of the families
    estimator: str = "decision"  # "decision" (per-decision Monte Carlo) or "group" (group-relative)
    branches: int = 6  # "decision": most branch rollouts per problem
    token_features: bool = True  # read the token identities (binds the policy to the vocabulary)
    history: list[dict] = field(default_factory=list)

    def __post_init__(self):
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {self.estimator!r}: choose from {', '.join(ESTIMATORS)}")


ESTIMATORS = ("decision", "group")


class NumpyPolicy:
    """The MLP's forward pass in numpy: pi(keep | f) = sigmoid(w2 . tanh(W1 (g - mu) / sd + b1 +
    sum_k E_k[t_k]) + b2), where g are the model-agnostic features (`GENERIC_FEATURES`) and t the
    token identities (`TOKEN_FEATURES`) read through the embedding tables E (`emb`, [3, n_vocab,
    hidden]; None: a model-agnostic policy). `vocabulary`: the fingerprint those ids belong to."""

    def __init__(self, mu, sd, w1, b1, w2, b2, emb=None, vocabulary: str | None = None):
        self.mu, self.sd, self.w1, self.b1, self.w2, self.b2 = (np.asarray(a, dtype=np.float64) for a in (mu, sd, w1, b1, w2, b2))
        self.emb = None if emb is None else np.asarray(emb, dtype=np.float64)
        self.vocabulary = vocabulary
        self._n = len(self.mu)

    @property
    def feature_names(self) -> tuple[str, ...]:
        return GENERIC_FEATURES + (TOKEN_FEATURES if self.emb is not None else ())

    def keep_probability(self, features: np.ndarray) -> float:
        pre = self.w1 @ ((features[: self._n] - self.mu) / self.sd) + self.b1
        if self.emb is not None:
            for k, token in enumerate(features[self._n : self._n + len(TOKEN_FEATURES)]):
                pre = pre + self.emb[k, int(token)]
        h = np.tanh(pre)
        return float(1.0 / (1.0 + np.exp(-(self.w2 @ h + self.b2)[0])))


def _torch_net(hidden: int, n_vocab: int | None = None, vocabulary: str | None = None):
    """The policy network: an MLP over the generic features, plus embedding tables for the token
    identities when `n_vocab` is given (zero at the start: they add nothing until trained)."""
    import torch

    n_features = len(GENERIC_FEATURES)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mu", torch.zeros(n_features))
            self.register_buffer("sd", torch.ones(n_features))
            self.hidden = torch.nn.Linear(n_features, hidden)
            self.out = torch.nn.Linear(hidden, 1)
            self.emb = None
            if n_vocab is not None:
                self.emb = torch.nn.Parameter(torch.zeros(len(TOKEN_FEATURES), n_vocab, hidden))

        def logit(self, x):
            pre = self.hidden((x[:, :n_features] - self.mu) / self.sd)
            if self.emb is not None:
                ids = x[:, n_features : n_features + len(TOKEN_FEATURES)].long()
                for k in range(len(TOKEN_FEATURES)):
                    pre = pre + self.emb[k][ids[:, k]]
            return self.out(torch.tanh(pre)).squeeze(-1)

        def numpy_policy(self) -> NumpyPolicy:
            d = {k: v.detach().double().numpy() for k, v in self.state_dict().items()}
            return NumpyPolicy(d["mu"], d["sd"], d["hidden.weight"], d["hidden.bias"], d["out.weight"], d["out.bias"],
                               d.get("emb"), vocabulary if self.emb is not None else None)

        def load_numpy(self, policy: NumpyPolicy) -> None:
            """Take `policy`'s weights (its token tables too, when both have them)."""
            with torch.no_grad():
                for name, value in (("mu", policy.mu), ("sd", policy.sd), ("hidden.weight", policy.w1),
                                    ("hidden.bias", policy.b1), ("out.weight", policy.w2), ("out.bias", policy.b2)):
                    self.state_dict()[name].copy_(torch.tensor(value, dtype=torch.float32))
                if self.emb is not None and policy.emb is not None:
                    self.emb.copy_(torch.tensor(policy.emb, dtype=torch.float32))

    return Net()


def export_onnx(policy: NumpyPolicy, path: str | Path, metadata: dict[str, str]) -> Path:
    """Write the MLP as an ONNX graph (Sub, Div, MatMul, Add, Tanh, Sigmoid; token identities:
    Slice, Clip, Cast, Gather from the embedding tables, ReduceSum) with `metadata`."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    f32 = np.float32
    n = len(policy.mu)
    names = policy.feature_names
    inits = [
        numpy_helper.from_array(policy.mu.astype(f32)[None, :], "mu"),
        numpy_helper.from_array(policy.sd.astype(f32)[None, :], "sd"),
        numpy_helper.from_array(policy.w1.T.astype(f32), "w1"),
        numpy_helper.from_array(policy.b1.astype(f32)[None, :], "b1"),
        numpy_helper.from_array(policy.w2.T.astype(f32), "w2"),
        numpy_helper.from_array(policy.b2.astype(f32)[None, :], "b2"),
    ]
    nodes = []
    generic = "features"
    if policy.emb is not None:
        k, n_vocab, hidden = policy.emb.shape
        i64 = np.int64
        inits += [
            numpy_helper.from_array(policy.emb.reshape(k * n_vocab, hidden).astype(f32), "emb"),
            numpy_helper.from_array(np.array([0], dtype=i64), "generic_start"),
            numpy_helper.from_array(np.array([n], dtype=i64), "generic_end"),  # = the ids' start
            numpy_helper.from_array(np.array([n + k], dtype=i64), "ids_end"),
            numpy_helper.from_array(np.array([1], dtype=i64), "axis1"),
            numpy_helper.from_array(np.array(0.0, dtype=f32), "id_min"),
            numpy_helper.from_array(np.array(n_vocab - 1, dtype=f32), "id_max"),
            numpy_helper.from_array((np.arange(k, dtype=i64) * n_vocab)[None, :], "table_offsets"),
        ]
        nodes += [
            helper.make_node("Slice", ["features", "generic_start", "generic_end", "axis1"], ["generic"]),
            helper.make_node("Slice", ["features", "generic_end", "ids_end", "axis1"], ["token_ids_f"]),
            helper.make_node("Clip", ["token_ids_f", "id_min", "id_max"], ["token_ids_c"]),
            helper.make_node("Cast", ["token_ids_c"], ["token_ids"], to=TensorProto.INT64),
            helper.make_node("Add", ["token_ids", "table_offsets"], ["rows"]),  # row of table k: k * n_vocab + id
            helper.make_node("Gather", ["emb", "rows"], ["embedded"], axis=0),
            helper.make_node("ReduceSum", ["embedded", "axis1"], ["token_sum"], keepdims=0),
        ]
        generic = "generic"
    nodes += [
        helper.make_node("Sub", [generic, "mu"], ["centred"]),
        helper.make_node("Div", ["centred", "sd"], ["scaled"]),
        helper.make_node("MatMul", ["scaled", "w1"], ["h1"]),
        helper.make_node("Add", ["h1", "b1"], ["h1b"]),
    ]
    pre = "h1b"
    if policy.emb is not None:
        nodes.append(helper.make_node("Add", ["h1b", "token_sum"], ["h1t"]))
        pre = "h1t"
    nodes += [
        helper.make_node("Tanh", [pre], ["h"]),
        helper.make_node("MatMul", ["h", "w2"], ["o1"]),
        helper.make_node("Add", ["o1", "b2"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["keep_probability"]),
    ]
    graph = helper.make_graph(
        nodes, "cospec_arbiter",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, len(names)])],
        [helper.make_tensor_value_info("keep_probability", TensorProto.FLOAT, [1, 1])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="cospec-local")
    model.ir_version = 8
    base = {"cospec.schema_version": SCHEMA_VERSION, "cospec.feature_names": ",".join(names)}
    if policy.vocabulary is not None:
        base["cospec.vocabulary"] = policy.vocabulary
    for key, value in {**base, **metadata}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, str(value)
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    onnx.save(model, tmp)
    tmp.replace(path)
    return path


def _rollout_config(max_tokens: int, seed: int) -> GenerationConfig:
    """Greedy cospec with a fixed draft length (-k, no timings): the arbiter's decisions do not
    depend on k, and a fixed k makes target calls per token, the reward's cost term, reproducible."""
    return GenerationConfig(mode="cospec", temperature=0.0, max_tokens=max_tokens, stop=TASK_STOP, seed=seed, adaptive=False)


def rollout(pair, problem: Problem, verifier, seed: int, max_tokens: int, cost: float = 0.0) -> tuple[float, bool, list]:
    """One cospec generation; returns (reward, correct, the verifier's recorded decisions)."""
    result = pair.generate(problem.prompt, _rollout_config(max_tokens, seed), verifier=verifier)
    correct = check(problem.family, result.text, problem.answer)
    target_calls = result.stats.model_calls.get("target", 0) / max(result.stats.n_generated, 1)
    return float(correct) - cost * target_calls, correct, list(verifier.decisions)


def accuracy(pair, policy, items: list[Problem], threshold: float = 0.5, max_tokens: int = 160) -> float:
    """Share of `items` a deterministic arbiter gets right."""
    return assess(pair, policy, items, threshold, max_tokens)["accuracy"]


def assess(pair, policy, items: list[Problem], threshold: float = 0.5, max_tokens: int = 160) -> dict:
    """A deterministic arbiter on `items`: its accuracy and target calls per generated token."""
    verifier = ArbitratingVerifier(policy, threshold)
    correct, calls, tokens = 0, 0, 0
    for problem in items:
        result = pair.generate(problem.prompt, _rollout_config(max_tokens, 0), verifier=verifier)
        correct += check(problem.family, result.text, problem.answer)
        calls += result.stats.model_calls.get("target", 0)
        tokens += result.stats.n_generated
    return {"accuracy": correct / max(len(items), 1), "target_calls_per_token": calls / max(tokens, 1)}


class Replay:
    """A policy for a branch rollout: the recorded choices first (probability 1 or 0, so a
    stochastic verifier repeats them), then `policy`'s probabilities."""

    def __init__(self, choices: list[bool], policy):
        self.choices, self.policy, self.calls = choices, policy, 0

    def keep_probability(self, features: np.ndarray) -> float:
        i, self.calls = self.calls, self.calls + 1
        if i < len(self.choices):
            return 1.0 if self.choices[i] else 0.0
        return self.policy.keep_probability(features)


def fit_rule(pair, items: list[Problem], max_tokens: int = 160, progress: bool = True) -> tuple[RulePolicy, float]:
    """The fixed-threshold rule (keep when q(x) > tau and p(y) < rho) with the best accuracy on
    `items` (training problems)."""
    from tqdm import tqdm

    grid = [(tau, rho) for tau in (0.3, 0.5, 0.7, 0.9) for rho in (0.3, 0.5, 0.7, 0.9, 1.01)]
    never = RulePolicy(1.1, 0.0)  # plain SD is a candidate too
    best = (never, accuracy(pair, never, items, max_tokens=max_tokens))
    for tau, rho in tqdm(grid, desc="rule grid", disable=not progress):
        acc = accuracy(pair, RulePolicy(tau, rho), items, max_tokens=max_tokens)
        if acc > best[1]:
            best = (RulePolicy(tau, rho), acc)
    return best


def _problems(families, start: int, n: int) -> list[Problem]:
    return [p for family in families for p in problems(family, "eval", n, start)]


class TaskSource:
    """Where training problems come from: task families (fresh seeded problems, far from the
    evaluation range) or a JSONL file (its last `held_out_share` kept for validation)."""

    def __init__(self, families: tuple[str, ...] = (), items: list[Problem] | None = None, held_out_share: float = 0.2):
        self.families = tuple(families)
        self.items = items
        if items is not None:
            if len(items) < 5:
                raise ValueError("a task file needs at least 5 problems to train on and validate with")
            cut = max(1, int(len(items) * held_out_share))
            self.train_items, self.held_items = items[:-cut], items[-cut:]

    def train_batch(self, rng: np.random.Generator, n: int) -> list[Problem]:
        if self.items is not None:
            return [self.train_items[int(i)] for i in rng.integers(0, len(self.train_items), size=n)]
        starts = rng.integers(0, 50_000, size=n)
        return [problems(self.families[i % len(self.families)], "eval", 1, TRAIN_START + int(s))[0] for i, s in enumerate(starts)]

    def train_set(self, n: int) -> list[Problem]:
        """A fixed set of training problems (for the rule's grid search and oracle labels)."""
        if self.items is not None:
            return self.train_items[:n]
        return _problems(self.families, TRAIN_START + 60_000, max(1, n // len(self.families)))

    def held_out(self, n: int) -> list[Problem]:
        if self.items is not None:
            return self.held_items
        return _problems(self.families, HELD_OUT_START, n)


def _network(pair, settings: TrainSettings):
    """A fresh policy network for `settings` on this pair (token tables sized to its vocabulary)."""
    if settings.token_features:
        return _torch_net(settings.hidden, pair.engine.n_vocab, pair.engine.vocabulary())
    return _torch_net(settings.hidden)


def train_policy(pair, out: str | Path, settings: TrainSettings, tasks: TaskSource | None = None,
                 checkpoint: str | Path | None = None, resume: bool = False, progress: bool = True,
                 rule: tuple[float, float] | None = None, init: NumpyPolicy | None = None) -> dict:
    """Train the arbiter by policy gradient and export it; returns the report. The history has,
    per epoch, the validation accuracy and the training rollouts run so far (branches included).

    `init`: start from these weights (e.g. the supervised baseline) instead of random ones."""
    import torch
    from tqdm import tqdm

    t_start = time.perf_counter()
    checkpoint = Path(checkpoint) if checkpoint else Path(str(out) + ".ckpt")
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)
    first_epoch = 0
    if resume:
        if not checkpoint.exists():
            raise ValueError(f"--resume: no checkpoint at {checkpoint}")
        state = torch.load(checkpoint, weights_only=False)
        saved = TrainSettings(**state["settings"])
        saved.families = tuple(saved.families)
        if (saved.families, saved.tasks, saved.held_out) != (settings.families, settings.tasks, settings.held_out):
            raise ValueError("--resume: the checkpoint was trained on other tasks or validated on another set "
                             f"(families {saved.families}, tasks {saved.tasks}, held-out {saved.held_out})")
        saved.epochs = settings.epochs  # resuming may extend the run; everything else is the run's own
        settings = saved
        net = _network(pair, settings)
        optimizer = torch.optim.Adam(net.parameters(), lr=settings.lr)
        net.load_state_dict(state["net"])
        optimizer.load_state_dict(state["optimizer"])
        first_epoch = len(settings.history)
        best = state["best"]
    else:
        net = _network(pair, settings)
        optimizer = torch.optim.Adam(net.parameters(), lr=settings.lr)
    tasks = tasks or TaskSource(settings.families)
    held_out = tasks.held_out(settings.held_out)
    if not resume:
        _initialise(net, pair, tasks, settings, init)
        settings.history = [{"epoch": 0, "rollouts": 0, **_validate(pair, net.numpy_policy(), held_out, settings)}]
        first_epoch = 1
        best = {"epoch": 0, "held_out_reward": settings.history[0]["held_out_reward"], "net": copy.deepcopy(net.state_dict())}
    per_epoch = settings.batches_per_epoch * settings.problems_per_batch
    rollouts = settings.history[-1].get("rollouts", 0)
    for epoch in range(first_epoch, settings.epochs + 1):
        rng = np.random.default_rng([settings.seed, epoch])
        rewards_seen: list[float] = []
        bar = tqdm(total=per_epoch, desc=f"epoch {epoch}/{settings.epochs}", disable=not progress)
        for _ in range(settings.batches_per_epoch):
            rollouts += _train_batch(pair, net, optimizer, tasks.train_batch(rng, settings.problems_per_batch), rng,
                                     settings, rewards_seen, bar)
        bar.close()
        held = _validate(pair, net.numpy_policy(), held_out, settings)
        settings.history.append({"epoch": epoch, "rollouts": rollouts, "train_reward": float(np.mean(rewards_seen)), **held})
        if held["held_out_reward"] > best["held_out_reward"]:
            best = {"epoch": epoch, "held_out_reward": held["held_out_reward"], "net": copy.deepcopy(net.state_dict())}
        if progress:
            print(f"epoch {epoch}: {rollouts} rollouts, train reward {np.mean(rewards_seen):.3f}, "
                  f"held-out accuracy {held['held_out_accuracy']:.3f}", flush=True)
        torch.save({"net": net.state_dict(), "optimizer": optimizer.state_dict(), "settings": asdict(settings),
                    "best": best}, checkpoint)
    seconds = time.perf_counter() - t_start
    net.load_state_dict(best["net"])
    algorithm = {"decision": "policy gradient, per-decision Monte Carlo advantages",
                 "group": "group-relative policy gradient"}[settings.estimator]
    metadata = {
        "cospec.threshold": "0.5",
        "cospec.training": json.dumps({"algorithm": algorithm,
                                       "start": "supervised (oracle labels)" if init is not None else "random",
                                       **asdict(settings),
                                       "exported_epoch": best["epoch"], "seconds": round(seconds, 1),
                                       "models": [str(slot.model.path.name) for slot in pair.engine.slots]}),
    }
    if rule is not None:
        metadata["cospec.rule_tau"], metadata["cospec.rule_rho"] = str(rule[0]), str(rule[1])
    export_onnx(net.numpy_policy(), out, metadata)
    return {"settings": asdict(settings), "exported_epoch": best["epoch"], "seconds": seconds, "out": str(out)}


def _validate(pair, policy, held_out: list[Problem], settings: TrainSettings) -> dict:
    """The deterministic policy on the validation problems: accuracy, target calls per token, and
    the reward the run maximises (accuracy - cost x calls), by which the exported epoch is chosen."""
    result = assess(pair, policy, held_out, max_tokens=settings.max_tokens)
    return {"held_out_accuracy": result["accuracy"], "held_out_target_calls_per_token": result["target_calls_per_token"],
            "held_out_reward": result["accuracy"] - settings.cost * result["target_calls_per_token"]}


def _initialise(net, pair, tasks: TaskSource, settings: TrainSettings, init: NumpyPolicy | None) -> None:
    """A fresh run's first weights: `init`'s, else random ones with a zero output bias and the
    features standardised on a first round of rollouts."""
    import torch

    if init is not None:
        net.load_numpy(init)
        return
    with torch.no_grad():
        net.out.bias.fill_(0.0)
    stats_items = tasks.train_batch(np.random.default_rng([settings.seed, 0]), 16)
    verifier = ArbitratingVerifier(net.numpy_policy(), stochastic=True)
    rows = [d.features for p in stats_items for d in rollout(pair, p, verifier, 1, settings.max_tokens)[2]]
    if rows:
        feats = np.stack(rows)[:, : len(GENERIC_FEATURES)]
        net.mu.copy_(torch.tensor(feats.mean(0), dtype=torch.float32))
        net.sd.copy_(torch.tensor(feats.std(0) + 1e-3, dtype=torch.float32))


def _train_batch(pair, net, optimizer, items: list[Problem], rng: np.random.Generator, settings: TrainSettings,
                 rewards_seen: list[float], bar) -> int:
    """One batch: rollouts of each problem with the current weights (`settings.estimator` says
    which), then one policy-gradient step on their decisions; returns the rollouts run."""
    import torch

    policy = net.numpy_policy()
    features, actions, weights = [], [], []
    n_rollouts = 0
    for problem in items:
        if settings.estimator == "group":
            verifier = ArbitratingVerifier(policy, stochastic=True)
            group = [rollout(pair, problem, verifier, int(rng.integers(1 << 31)), settings.max_tokens, settings.cost)
                     for _ in range(settings.group_size)]
            n_rollouts += len(group)
            rewards = np.array([g[0] for g in group])
            rewards_seen.extend(rewards.tolist())
            for advantage, (_, _, decisions) in zip(rewards - rewards.mean(), group):
                for d in decisions:
                    features.append(d.features)
                    actions.append(float(d.kept))
                    weights.append(advantage)
        else:
            n_rollouts += _branch_decisions(pair, problem, policy, rng, settings, features, actions, weights, rewards_seen)
        bar.update(1)
        bar.set_postfix(reward=f"{np.mean(rewards_seen):.3f}")
    if features and any(w != 0 for w in weights):
        x = torch.tensor(np.stack(features), dtype=torch.float32)
        a = torch.tensor(actions)
        w = torch.tensor(weights, dtype=torch.float32)
        logits = net.logit(x)
        log_prob = -torch.nn.functional.binary_cross_entropy_with_logits(logits, a, reduction="none")
        loss = -(w * log_prob).sum() / len(features)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return n_rollouts


def _branch_decisions(pair, problem: Problem, policy, rng: np.random.Generator, settings: TrainSettings,
                      features: list, actions: list, weights: list, rewards_seen: list) -> int:
    """The per-decision Monte Carlo estimator for one problem (see the module docstring): appends
    each branched decision's features, action and advantage; returns the rollouts run."""
    seed = int(rng.integers(1 << 31))
    reward, _, decisions = rollout(pair, problem, ArbitratingVerifier(policy, stochastic=True), seed,
                                   settings.max_tokens, settings.cost)
    rewards_seen.append(reward)
    chosen = range(len(decisions))
    if len(decisions) > settings.branches:
        chosen = sorted(rng.choice(len(decisions), settings.branches, replace=False))
    for i in chosen:
        d = decisions[i]
        replay = Replay([e.kept for e in decisions[:i]] + [not d.kept], policy)
        other, _, _ = rollout(pair, problem, ArbitratingVerifier(replay, stochastic=True), int(rng.integers(1 << 31)),
                              settings.max_tokens, settings.cost)
        keep = policy.keep_probability(d.features)
        taken = keep if d.kept else 1.0 - keep
        features.append(d.features)
        actions.append(float(d.kept))
        weights.append((1.0 - taken) * (reward - other))
    return 1 + len(chosen)


def oracle_labels(pair, items: list[Problem], max_tokens: int = 160) -> tuple[np.ndarray, np.ndarray]:
    """AutoJudge-style labels: along the always-defer (plain SD) decoding of each problem, keep the
    draft's token at ONE mismatch (deferring elsewhere); label 1 when that turns a wrong answer
    right, 0 when it turns a right one wrong (ties carry no label)."""
    from ..arbiter import ConstantPolicy

    xs, ys = [], []
    for problem in items:
        recorder = ArbitratingVerifier(ConstantPolicy(0.0), stochastic=True)
        _, base_correct, decisions = rollout(pair, problem, recorder, 0, max_tokens)
        for i, decision in enumerate(decisions):
            keep_at = Replay([False] * i + [True], ConstantPolicy(0.0))
            _, correct, _ = rollout(pair, problem, ArbitratingVerifier(keep_at), 0, max_tokens)
            if correct != base_correct:
                xs.append(decision.features)
                ys.append(1.0 if correct else 0.0)
    return (np.stack(xs) if xs else np.zeros((0, len(FEATURE_NAMES)))), np.array(ys)


def train_supervised(x: np.ndarray, y: np.ndarray, hidden: int = 16, epochs: int = 400, lr: float = 0.03, seed: int = 0,
                     n_vocab: int | None = None, vocabulary: str | None = None) -> NumpyPolicy:
    """The same MLP fitted to oracle labels by cross-entropy (the supervised baseline); with
    `n_vocab` (and the pair's `vocabulary` fingerprint) it reads the token identities too."""
    import torch

    if len(y) == 0 or y.min() == y.max():
        raise ValueError(f"the supervised baseline needs labels of both kinds; got {len(y)} labels "
                         f"({int(y.sum()) if len(y) else 0} keep): label more problems")
    torch.manual_seed(seed)
    net = _torch_net(hidden, n_vocab, vocabulary)
    generic = x[:, : len(GENERIC_FEATURES)]
    with torch.no_grad():
        net.mu.copy_(torch.tensor(generic.mean(0), dtype=torch.float32))
        net.sd.copy_(torch.tensor(generic.std(0) + 1e-3, dtype=torch.float32))
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    xt, yt = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
    for _ in range(epochs):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net.logit(xt), yt)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net.numpy_policy()


def task_source(settings: TrainSettings) -> TaskSource:
    """The problems `settings` trains on: its JSONL task file, else its task families."""
    if settings.tasks:
        from .testworld.tasks import load_jsonl_tasks

        return TaskSource(items=load_jsonl_tasks(settings.tasks))
    return TaskSource(settings.families)


def run_training(pair, out: str | Path, settings: TrainSettings, tasks: TaskSource | None = None, *, resume: bool = False,
                 rule_baseline: bool = True, compare_supervised: int = 0, init_supervised: bool = False,
                 log=print) -> dict:
    """`cospec-local train-policy`: fit the rule baseline (`rule_baseline`; its thresholds go into the
    policy's metadata), train the supervised baseline on oracle labels from `compare_supervised`
    training problems (the RL run's start with `init_supervised`), then `train_policy`. `log` gets
    one line per baseline. Writes the report as JSON beside `out` and returns it."""
    tasks = tasks or task_source(settings)
    if init_supervised and not compare_supervised:
        raise ValueError("--init-supervised needs --compare-supervised N (the problems to label)")
    report: dict = {}
    rule = None
    if rule_baseline:
        report["rule"] = _rule_baseline(pair, tasks, settings.held_out, log)
        rule = (report["rule"]["tau"], report["rule"]["rho"])
    supervised = None
    if compare_supervised:
        supervised, report["supervised"] = _supervised_baseline(pair, tasks, compare_supervised, settings, log)
    report.update(train_policy(pair, out, settings, tasks, resume=resume, rule=rule,
                               init=supervised if init_supervised else None))
    Path(out).with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def _rule_baseline(pair, tasks: TaskSource, held_out: int, log) -> dict:
    """The fixed-threshold rule fitted on 100 training problems, scored on the held-out ones."""
    rule_policy, rule_accuracy = fit_rule(pair, tasks.train_set(100))
    tau, rho = rule_policy.tau, rule_policy.rho
    result = {"tau": tau, "rho": rho, "train_accuracy": rule_accuracy,
              "held_out_accuracy": accuracy(pair, rule_policy, tasks.held_out(held_out))}
    log(f"rule: keep when q(x) > {tau} and p(y) < {rho} (train accuracy {rule_accuracy:.3f}, "
        f"held-out {result['held_out_accuracy']:.3f})")
    return result


def _supervised_baseline(pair, tasks: TaskSource, n_problems: int, settings: TrainSettings, log) -> tuple[NumpyPolicy, dict]:
    """The MLP fitted to oracle labels from `n_problems` training problems, scored on the held-out ones."""
    t0 = time.perf_counter()
    x, y = oracle_labels(pair, tasks.train_set(n_problems))
    vocab = (pair.engine.n_vocab, pair.engine.vocabulary()) if settings.token_features else (None, None)
    supervised = train_supervised(x, y, hidden=settings.hidden, seed=settings.seed, n_vocab=vocab[0], vocabulary=vocab[1])
    result = {"labels": int(len(y)), "positive": int(y.sum()), "seconds": time.perf_counter() - t0,
              "held_out_accuracy": accuracy(pair, supervised, tasks.held_out(settings.held_out))}
    log(f"supervised baseline on {len(y)} oracle labels: held-out accuracy {result['held_out_accuracy']:.3f}")
    return supervised, result
