"""CoSpec: the arbitrating verifier, the ONNX policy runtime, RL training and the command line."""

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cli.main import cli
from cospec_local import load_pair
from cospec_local.arbiter import FEATURE_NAMES, GENERIC_FEATURES, GENERIC_POLICY, ArbitratingVerifier, ConstantPolicy, OnnxPolicy, PolicyError
from cospec_local.config import GenerationConfig
from cospec_local.lab.testworld.tasks import TASK_STOP
from cospec_local.lab.testworld.tasks import problems
from cospec_local.lab.training import NumpyPolicy, TaskSource, TrainSettings, export_onnx, train_policy
from cospec_local.verify import ACCEPTED, ARBITRATED, BONUS, CORRECTION
from cospec_local.api import collect
from fake_backend import N_VOCAB, make_engine
from stats_util import assert_matches

FAMILY = Path(__file__).resolve().parents[1] / "models" / "family"
DRAFT, TARGET = str(FAMILY / "draft.gguf"), str(FAMILY / "target.gguf")
PROMPTS = [p.prompt for family in ("add", "count") for p in problems(family, "eval", 8, start=700)]
N = len(GENERIC_FEATURES)


def constant_policy_file(path, keep: bool) -> Path:
    """An ONNX policy whose output is (almost exactly) 1 or 0 whatever the features."""
    bias = 30.0 if keep else -30.0
    return export_onnx(NumpyPolicy(np.zeros(N), np.ones(N), np.zeros((4, N)), np.zeros(4), np.zeros((1, 4)), [bias]),
                       path, {"cospec.threshold": "0.5"})


@pytest.fixture(scope="module")
def pair():
    with load_pair(DRAFT, TARGET, n_ctx=512, n_threads=1) as pair:
        yield pair


@pytest.fixture(scope="module")
def policies(tmp_path_factory):
    d = tmp_path_factory.mktemp("policies")
    return {"keep": constant_policy_file(d / "keep.onnx", True), "defer": constant_policy_file(d / "defer.onnx", False)}


def greedy(pair, prompt, **kw):
    return pair.generate(prompt, temperature=0, max_tokens=150, stop=TASK_STOP, **kw)


def test_a_policy_that_always_defers_gives_plain_speculative_output(pair, policies):
    """Through the ONNX runtime: every mismatch defers, so the output is plain SD's, which is the
    target's; mismatches are counted, nothing is overridden."""
    mismatches = 0
    for prompt in PROMPTS:
        spec = greedy(pair, prompt, mode="spec")
        out = greedy(pair, prompt, mode="cospec", policy=str(policies["defer"]))
        assert out.tokens == spec.tokens == greedy(pair, prompt, mode="target").tokens
        assert out.stats.n_overrides == 0 and ARBITRATED not in out.sources
        mismatches += out.stats.n_mismatches
    assert mismatches > 0


def test_a_policy_that_always_keeps_gives_draft_only_output(pair, policies):
    """Every mismatch keeps the draft's token, and the draft reads every held bonus token: draft-only
    output; a target token is emitted only where the draft would have written the same one."""
    overrides = held = 0
    for prompt in PROMPTS:
        out = greedy(pair, prompt, mode="cospec", policy=str(policies["keep"]))
        assert out.tokens == greedy(pair, prompt, mode="draft").tokens
        assert set(out.sources) <= {ACCEPTED, ARBITRATED, BONUS}
        assert out.stats.n_overrides == out.stats.n_mismatches
        overrides += out.stats.n_overrides
        held += out.sources.count(BONUS)
    assert overrides > 0 and held > 0


def test_arbitration_time_is_measured_and_small(pair, policies):
    """Scoring time is in the stats (counted at mismatches only, so a small share of decoding; the
    5% figure itself is measured by `eval`, not asserted by a timed test)."""
    total = arbiter = 0.0
    for prompt in PROMPTS:
        out = greedy(pair, prompt, mode="cospec", policy=str(policies["keep"]))
        total += out.stats.t_decode
        arbiter += out.stats.t_arbiter
    assert 0 < arbiter < 0.25 * total


@pytest.mark.parametrize("tokens", [False, True])
def test_onnxruntime_scores_equal_the_training_forward_pass(tmp_path, tokens):
    """The exported graph computes what torch computes for the trained network (and the numpy
    copy used in rollouts): float32 against float32 within 1e-5; with token features, through
    the embedding tables (looked up by the ids in the last three columns)."""
    import torch

    from cospec_local.lab.training import _torch_net

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    n_vocab = 37
    net = _torch_net(8, n_vocab if tokens else None, "37:test" if tokens else None)
    with torch.no_grad():
        net.mu.copy_(torch.tensor(rng.normal(size=N), dtype=torch.float32))
        net.sd.copy_(torch.tensor(rng.uniform(0.5, 2, size=N), dtype=torch.float32))
        if tokens:
            net.emb.copy_(torch.tensor(rng.normal(size=net.emb.shape), dtype=torch.float32))
    onnx_policy = OnnxPolicy(export_onnx(net.numpy_policy(), tmp_path / "p.onnx", {}))
    assert onnx_policy.feature_names == (FEATURE_NAMES if tokens else GENERIC_FEATURES)
    assert onnx_policy.vocabulary == ("37:test" if tokens else None)
    rows = np.concatenate([rng.normal(size=(200, N)), rng.integers(0, n_vocab, size=(200, 3))], axis=1).astype(np.float32)
    got = np.array([onnx_policy.keep_probability(r) for r in rows])
    with torch.no_grad():
        expected = torch.sigmoid(net.logit(torch.tensor(rows))).numpy()
    assert np.abs(got - expected).max() < 1e-5
    assert np.abs(got - [net.numpy_policy().keep_probability(r.astype(np.float64)) for r in rows]).max() < 1e-5
    assert got.std() > 0.02  # the rows really exercise the network
    if tokens:  # the ids matter: the same generic features with other tokens score differently
        other = rows.copy()
        other[:, N:] = (other[:, N:] + 1) % n_vocab
        assert np.abs(got - [onnx_policy.keep_probability(r) for r in other]).max() > 0.05


def test_bad_policy_files_are_refused_clearly(tmp_path):
    import onnx

    with pytest.raises(PolicyError, match="not found"):
        OnnxPolicy(tmp_path / "missing.onnx")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07garbage" * 50)
    with pytest.raises(PolicyError, match="not a loadable ONNX policy"):
        OnnxPolicy(corrupt)
    good = constant_policy_file(tmp_path / "good.onnx", True)

    def with_metadata(name, **changes):
        model = onnx.load(good)
        for entry in model.metadata_props:
            if entry.key in changes:
                entry.value = changes.pop(entry.key)
        path = tmp_path / name
        onnx.save(model, path)
        return path

    with pytest.raises(PolicyError, match="feature schema '0'"):
        OnnxPolicy(with_metadata("old.onnx", **{"cospec.schema_version": "0"}))
    with pytest.raises(PolicyError, match="unknown feature names"):
        OnnxPolicy(with_metadata("names.onnx", **{"cospec.feature_names": "draft_p_own,token_id"}))
    with pytest.raises(PolicyError, match="metadata lists 3 features"):
        OnnxPolicy(with_metadata("width.onnx", **{"cospec.feature_names": "draft_p_own,target_p_own,draft_entropy"}))


def token_policy_file(path, vocabulary: str, n_vocab: int) -> Path:
    """A vocabulary-bound policy (token features, random tables) claiming `vocabulary`."""
    rng = np.random.default_rng(0)
    policy = NumpyPolicy(np.zeros(N), np.ones(N), rng.normal(size=(4, N)), np.zeros(4), rng.normal(size=(1, 4)), [0.0],
                         emb=rng.normal(size=(3, n_vocab, 4)), vocabulary=vocabulary)
    return export_onnx(policy, path, {"cospec.threshold": "0.5"})


def test_a_vocabulary_bound_policy_runs_only_on_its_vocabulary(pair, tmp_path):
    """A policy reading token ids names the vocabulary it was trained with: on that pair it runs;
    given explicitly for another vocabulary it is refused with the reason; as the default it
    gives way to the shipped model-agnostic policy."""
    from cospec_local.engine import Engine

    n_vocab = pair.engine.n_vocab
    ours = token_policy_file(tmp_path / "ours.onnx", pair.engine.vocabulary(), n_vocab)
    assert pair.engine.load_policy(str(ours)).vocabulary == pair.engine.vocabulary()
    out = greedy(pair, PROMPTS[0], mode="cospec", policy=str(ours))
    assert out.stats.n_generated > 0
    other = token_policy_file(tmp_path / "other.onnx", f"{n_vocab}:0123456789abcdef", n_vocab)
    with pytest.raises(PolicyError, match="reads token identities of the vocabulary it was trained with"):
        greedy(pair, PROMPTS[0], mode="cospec", policy=str(other))
    r = CliRunner().invoke(cli, ["generate", "Q: 1+2=?\n", "--draft", DRAFT, "--target", TARGET, "--ctx-size", "512",
                                 "--mode", "cospec", "--policy", str(other)])
    assert r.exit_code == 1 and "train one for this pair" in r.output
    fake, _ = make_engine()
    assert fake.load_policy(None).path == GENERIC_POLICY.resolve()
    assert OnnxPolicy(GENERIC_POLICY).vocabulary is None


def test_cli_refuses_a_bad_policy_before_generating(tmp_path):
    r = CliRunner().invoke(cli, ["generate", "Q: 1+2=?\n", "--draft", DRAFT, "--target", TARGET, "--ctx-size", "512",
                                 "--mode", "cospec", "--policy", str(tmp_path / "nope.onnx")])
    assert r.exit_code == 1 and "policy file not found" in r.output


def test_sampled_cospec_follows_the_target_when_deferring_and_the_draft_when_keeping():
    """Sampled arbitration on scripted models: always deferring is rejection sampling against the
    target (its distribution), always keeping emits the draft's own samples (its distribution)."""
    from cospec_local.sampling import SamplingParams, logits_to_probs

    engine, models = make_engine((11, 22))
    params = SamplingParams(temperature=1.0)
    prompt = [1, 2, 3]
    for keep, model in ((0.0, models[1]), (1.0, models[0])):
        expected = logits_to_probs(model.logits_after(prompt), params)
        counts = np.zeros(N_VOCAB)
        kinds = set()
        for seed in range(3000):
            config = GenerationConfig(mode="cospec", temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, max_tokens=1,
                                      seed=seed, adaptive=False, draft_max=2)
            result = collect(engine.stream(prompt, config, ArbitratingVerifier(ConstantPolicy(keep)), engine.new_conversation()))
            counts[result.tokens[0]] += 1
            kinds.update(result.sources)
        assert_matches(counts, expected)
        assert (CORRECTION in kinds) == (keep == 0.0) and (ARBITRATED in kinds) == (keep == 1.0)


@pytest.mark.parametrize("estimator", ["decision", "group"])
def test_a_short_seeded_training_run_beats_its_initial_policy(pair, tmp_path, estimator):
    """Policy gradient on the test world, from random weights, with either advantage estimator:
    held-out accuracy of the deterministic policy after three epochs is above that of the
    initial (untrained) one, and the history counts the rollouts (branches included)."""
    cost = 0.5 if estimator == "group" else 0.0  # a cost per target call: the epoch is chosen by reward
    settings = TrainSettings(epochs=3, batches_per_epoch=2, problems_per_batch=12, group_size=6, held_out=40, seed=0,
                             estimator=estimator, cost=cost)
    report = train_policy(pair, tmp_path / "p.onnx", settings, TaskSource(("add", "count")), progress=False)
    history = report["settings"]["history"]
    assert history[-1]["held_out_accuracy"] > history[0]["held_out_accuracy"]
    for h in history:
        assert 0 < h["held_out_target_calls_per_token"] < 1
        assert h["held_out_reward"] == pytest.approx(h["held_out_accuracy"] - cost * h["held_out_target_calls_per_token"])
    assert report["exported_epoch"] == max(range(len(history)), key=lambda e: (history[e]["held_out_reward"], -e))
    rollouts = [h["rollouts"] for h in history]
    assert rollouts[0] == 0 and all(b > a for a, b in zip(rollouts, rollouts[1:]))
    if estimator == "group":
        assert rollouts[-1] == 3 * 2 * 12 * 6
    else:  # one rollout per problem plus one branch per decision (at most `branches`)
        assert 3 * 2 * 12 < rollouts[-1] <= 3 * 2 * 12 * (1 + settings.branches)
    policy = OnnxPolicy(tmp_path / "p.onnx")
    training = json.loads(policy.metadata["cospec.training"])
    assert training["estimator"] == estimator and training["start"] == "random"
    assert policy.feature_names == FEATURE_NAMES and policy.vocabulary == pair.engine.vocabulary()


def test_train_policy_on_a_jsonl_task_file(tmp_path):
    """--tasks: problems from a file, checked by their ANSWER line, the last 20% held out."""
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"prompt": p.prompt, "answer": p.answer}) + "\n" for p in problems("count", "eval", 10, 900)))
    out = tmp_path / "p.onnx"
    r = CliRunner().invoke(cli, ["train-policy", "--draft", DRAFT, "--target", TARGET, "--ctx-size", "512", "--threads", "1",
                                 "--tasks", str(tasks), "--out", str(out), "--epochs", "1", "--batches-per-epoch", "1",
                                 "--problems-per-batch", "3", "--group-size", "2", "--no-fit-rule"])
    assert r.exit_code == 0, r.output
    history = json.loads(out.with_suffix(".json").read_text())["settings"]["history"]
    assert len(history) == 2 and all(0.0 <= h["held_out_accuracy"] <= 1.0 for h in history)


def test_train_policy_command_writes_a_policy_and_resumes(tmp_path):
    """`train-policy` exports an ONNX policy with a report; --resume continues the same run."""
    out = tmp_path / "p.onnx"
    common = ["train-policy", "--draft", DRAFT, "--target", TARGET, "--ctx-size", "512", "--threads", "1", "--out", str(out),
              "--batches-per-epoch", "1", "--problems-per-batch", "4", "--group-size", "3", "--held-out", "5", "--no-fit-rule"]
    r = CliRunner().invoke(cli, common + ["--epochs", "1"])
    assert r.exit_code == 0, r.output
    assert [h["epoch"] for h in json.loads(out.with_suffix(".json").read_text())["settings"]["history"]] == [0, 1]
    r = CliRunner().invoke(cli, common + ["--epochs", "2", "--resume"])
    assert r.exit_code == 0, r.output
    assert [h["epoch"] for h in json.loads(out.with_suffix(".json").read_text())["settings"]["history"]] == [0, 1, 2]
    assert OnnxPolicy(out).feature_names == FEATURE_NAMES


def test_eval_compares_target_draft_spec_cospec_rule_and_oracle(tmp_path, policies):
    out = tmp_path / "eval.json"
    r = CliRunner().invoke(cli, ["eval", "--draft", DRAFT, "--target", TARGET, "--ctx-size", "512", "--threads", "1",
                                 "--family", "count", "-n", "12", "--modes", "target,draft,spec,cospec,rule,oracle",
                                 "--policy", str(policies["keep"]), "--rule", "0.5,0.9", "--out", str(out)])
    assert r.exit_code == 0, r.output
    modes = {m["mode"]: m for m in json.loads(out.read_text())["modes"]}
    assert list(modes) == ["target", "draft", "spec", "cospec", "rule", "oracle"]
    assert modes["cospec"]["per_problem"] == modes["draft"]["per_problem"]  # the always-keep policy
    assert modes["spec"]["per_problem"] == modes["target"]["per_problem"]
    # On counting the draft knows the tally step the target never learned: the oracle gains.
    assert modes["oracle"]["correct"] > modes["target"]["correct"]
    assert modes["cospec"]["overrides"] == modes["cospec"]["mismatches"] > 0
    assert 0 < modes["spec"]["target_calls_per_token"] < 1


def test_the_shipped_policy_loads_and_is_the_one_in_models(pair):
    """The library's default policy is the test-world policy shipped in models/family: trained by
    RL (per-decision advantages, from the supervised start, an RL epoch exported), bound to the
    family's vocabulary, with its provenance and fitted rule; `--mode cospec` uses it without
    --policy. The model-agnostic policy for other pairs ships beside it."""
    from cospec_local.arbiter import DEFAULT_POLICY

    shipped = FAMILY / "policy.onnx"
    assert DEFAULT_POLICY.read_bytes() == shipped.read_bytes()
    policy = OnnxPolicy(DEFAULT_POLICY)
    training = json.loads(policy.metadata["cospec.training"])
    assert training["algorithm"] == "policy gradient, per-decision Monte Carlo advantages"
    assert training["start"] == "supervised (oracle labels)" and training["exported_epoch"] > 0
    assert {"cospec.rule_tau", "cospec.rule_rho"} <= set(policy.metadata)
    assert policy.vocabulary == pair.engine.vocabulary() and pair.engine.load_policy(None).path == DEFAULT_POLICY.resolve()
    assert OnnxPolicy(GENERIC_POLICY).vocabulary is None
    out = greedy(pair, PROMPTS[-1], mode="cospec")
    assert out.stats.n_generated > 0 and out.finish_reason == "stop"


@pytest.mark.slow
def test_the_default_pair_runs_cospec(default_pair_paths):
    """The default Gemma pair (trimmed draft: draft rows read through the token map) runs
    --mode cospec with the shipped, model-agnostic policy."""
    draft, target = default_pair_paths
    with load_pair(draft, target, n_ctx=512) as gemma:
        out = gemma.generate("def quicksort(arr):", mode="cospec", temperature=0, max_tokens=48)
        assert out.stats.n_generated == 48
        assert out.stats.n_overrides <= out.stats.n_mismatches
        assert set(out.sources) <= {ACCEPTED, ARBITRATED, CORRECTION, BONUS}
        # The shipped policy reads the test world's token ids: Gemma gets the model-agnostic one.
        assert gemma.engine.load_policy(None).path == GENERIC_POLICY.resolve()


def test_cospec_output_does_not_depend_on_where_draft_runs_are_cut(pair):
    """No feature depends on the run boundaries, which the adaptive draft length picks from
    timings, and every position is judged (held bonus tokens too): greedy cospec output is the
    same for every draft length, adaptive or fixed."""
    prompts = [p.prompt for family in ("add", "count") for p in problems(family, "eval", 20, start=200_244 - 20)]
    for prompt in prompts + PROMPTS[:4] + PROMPTS[-4:]:
        outputs = {tuple(greedy(pair, prompt, mode="cospec", draft_max=k, adaptive=adaptive).tokens)
                   for k in (1, 2, 3, 6) for adaptive in (False, True)}
        assert len(outputs) == 1, prompt


def test_the_arbiter_sees_each_mismatch_at_its_position_in_the_reply(pair):
    """The features' tokens and positions are the reply's: with a deferring policy the target's
    token at a mismatch is the token emitted at the position the features name, the draft's
    token differs from it, and the token before it is the one emitted before it (whatever k)."""
    import math

    from cospec_local.arbiter import FEATURE_NAMES

    col = {name: FEATURE_NAMES.index(name) for name in ("position_in_answer", "draft_token", "target_token", "previous_token")}
    checked = 0
    for k in (2, 6):
        for prompt in PROMPTS:
            verifier = ArbitratingVerifier(ConstantPolicy(0.0), stochastic=True)
            out = pair.generate(prompt, mode="cospec", temperature=0, max_tokens=150, stop=TASK_STOP, draft_max=k,
                                adaptive=False, verifier=verifier)
            context = pair.tokenize(prompt) + out.tokens
            n_prompt = len(context) - len(out.tokens)
            for decision in verifier.decisions:
                f = decision.features
                position = round(math.expm1(5 * float(f[col["position_in_answer"]])))
                if position >= len(out.tokens):  # in the stop string (not part of the reply)
                    assert out.finish_reason == "stop" and position < len(out.tokens) + 3
                    continue
                checked += 1
                assert out.tokens[position] == f[col["target_token"]] != f[col["draft_token"]]
                assert context[n_prompt + position - 1] == f[col["previous_token"]]
    assert checked > 20


def test_greedy_cospec_makes_spec_s_model_calls(pair, policies):
    """With the held bonus a greedy cospec cycle costs spec's calls: with a fixed -k and no
    confidence stops, k drafted tokens per cycle, one draft call per drafted token (the call that
    reads a held bonus is the next cycle's first; at most one more reads the reply's last bonus)
    and one target call per cycle; a deferring policy gives spec's tokens."""
    # k = 6 fills the exact batch: a held bonus takes the place of spec's last committed token.
    assert pair.engine.exact_batch == 7
    for k in (4, 6):
        for prompt in PROMPTS[::2]:
            spec, out = (greedy(pair, prompt, mode=mode, draft_max=k, adaptive=False, draft_p_min=0.0,
                                policy=str(policies["defer"])) for mode in ("spec", "cospec"))
            assert out.tokens == spec.tokens
            s = out.stats
            assert s.n_drafted <= s.model_calls["draft"] <= s.n_drafted + 1
            assert s.model_calls["target"] == s.n_cycles
            assert set(s.draft_lengths[:-1]) == {k}


def test_a_reply_cut_by_max_tokens_is_a_prefix_of_the_longer_one(pair):
    """The last token of a reply cut by --max-tokens is a held bonus the draft still reads (and
    the arbiter may replace): every cut is a prefix of the full reply."""
    for prompt in PROMPTS[:4] + PROMPTS[-4:]:
        full = greedy(pair, prompt, mode="cospec").tokens
        for n in (1, 2, 3, 5, 8, 13):
            out = pair.generate(prompt, mode="cospec", temperature=0, max_tokens=n, stop=TASK_STOP)
            assert out.tokens == full[:n]


def test_cospec_runs_to_the_last_slot_of_the_context(tmp_path, policies):
    """At the end of the context cospec needs no bonus slot: it fills the context and stops with
    finish 'context' (it used to spin when one slot was left)."""
    with load_pair(DRAFT, TARGET, n_ctx=256, n_threads=1) as small:
        n_ctx = small.engine.n_ctx
        prompt = small.tokenize(problems("count", "eval", 1, 5)[0].prompt)
        prompt = (prompt * (n_ctx // len(prompt) + 1))[: n_ctx - 9]
        reasons = set()
        for adaptive in (False, True):
            for policy in ("keep", "defer"):
                out = small.generate(prompt, mode="cospec", temperature=0, max_tokens=100, adaptive=adaptive,
                                     policy=str(policies[policy]))
                assert out.finish_reason in ("context", "stop")
                reasons.add(out.finish_reason)
                if out.finish_reason == "context":
                    assert len(prompt) + out.stats.n_generated == n_ctx
        assert "context" in reasons  # the last slot was actually reached


def test_cospec_runs_fill_the_verification_batch_spec_would_use(pair):
    """Greedy, cospec's cycles are spec's: k drafted tokens (after the held bonus) in a batch of
    k + 1 rows; sampled, it has no bonus row, so its draft writes k + 1 tokens per verification."""
    for temperature, extra in ((0.0, 0), (0.8, 1)):
        for k in (2, 5):
            lengths = []
            for prompt in PROMPTS:
                out = pair.generate(prompt, mode="cospec", temperature=temperature, seed=1, max_tokens=150, stop=TASK_STOP,
                                    draft_max=k, adaptive=False, draft_p_min=0.0)
                lengths += out.stats.draft_lengths
                assert out.stats.model_calls["target"] == out.stats.n_cycles
            assert max(lengths) == k + extra
            assert sum(n == k + extra for n in lengths) > 0.8 * len(lengths)
