"""Task generators and checkers: seeded, disjoint train/eval seeds, right/wrong/malformed answers."""

import json

import pytest

from cospec_local.lab.testworld.tasks import (
    FAMILIES,
    SPLIT_SEED_BASE,
    SPLIT_SIZE,
    check,
    extract_answer,
    load_jsonl_tasks,
    make_add_problem,
    make_problem,
    problems,
)


@pytest.mark.parametrize("family", FAMILIES)
def test_generators_are_deterministic_by_seed(family):
    assert problems(family, "eval", 30) == problems(family, "eval", 30)
    assert problems(family, "train", 5, start=7) == problems(family, "train", 12)[7:]
    assert len({p.prompt for p in problems(family, "train", 30)}) > 20  # seeds change the problem


@pytest.mark.parametrize("family", FAMILIES)
def test_train_and_eval_seed_ranges_are_disjoint(family):
    train_seeds = {p.seed for p in problems(family, "train", 200)}
    eval_seeds = {p.seed for p in problems(family, "eval", 200)}
    assert not train_seeds & eval_seeds
    assert all(SPLIT_SEED_BASE["train"] <= s < SPLIT_SEED_BASE["train"] + SPLIT_SIZE for s in train_seeds)
    assert all(s >= SPLIT_SEED_BASE["eval"] for s in eval_seeds)
    with pytest.raises(ValueError):
        problems(family, "train", 2, start=SPLIT_SIZE - 1)  # would run into the eval seeds


@pytest.mark.parametrize("family", FAMILIES)
def test_reference_solutions_pass_their_checker(family):
    for problem in problems(family, "eval", 200):
        assert problem.solution.endswith(f"ANSWER: {problem.answer}\n")
        assert check(family, problem.solution, problem.answer)


def test_add_answers_are_the_sums_and_steps_show_carries():
    for problem in problems("add", "eval", 200):
        a, b = problem.prompt.removeprefix("Q: ").removesuffix("=?\n").split("+")
        assert int(problem.answer) == int(a) + int(b)
        assert len(problem.solution.splitlines()) == len(a) + 1  # one line per column + answer
    problem = make_problem("add", 0)
    assert problem.prompt.startswith("Q: ") and problem.solution.splitlines()[0].count("+") == 2


def test_count_answers_are_letter_counts():
    for problem in problems("count", "eval", 200):
        letter, text = problem.prompt.removeprefix("Q: count ").removesuffix("=?\n").split(" in ")
        assert int(problem.answer) == text.count(letter)


def test_thin_sums_make_those_columns_rare():
    def share_of_sums(sums, **thin):
        columns = [int(line.split("=")[1]) for seed in range(400)
                   for line in make_add_problem(seed, **thin).solution.splitlines()[:-1]]
        return sum(column in sums for column in columns) / len(columns)

    assert share_of_sums({13, 14}) > 0.08  # the evaluation distribution has them
    assert share_of_sums({13, 14}, thin_sums=(13, 14), thin_keep=0.0) == 0.0
    assert 0.0 < share_of_sums({13, 14}, thin_sums=(13, 14), thin_keep=0.1) < 0.03
    assert make_add_problem(5) == make_problem("add", 5)


def test_checker_right_wrong_and_malformed():
    assert check("add", "1+2+0=03\nANSWER: 3\n", "3")
    assert check("add", "ANSWER:3", "3")
    assert check("count", "a1 b1\nANSWER: 1\n\n", "1")
    assert not check("add", "1+2+0=03\nANSWER: 4\n", "3")  # wrong
    assert not check("add", "1+2+0=03\n", "3")  # no answer line
    assert not check("add", "ANSWER: 3x", "3")  # malformed number
    assert not check("add", "ANSWER: ", "3")
    assert not check("count", "ANSWER: 3\nANSWER: 2", "3")  # the last answer line counts
    assert check("count", "ANSWER: 2\nANSWER: 3", "3")
    assert extract_answer("no answer here") is None


def test_load_jsonl_tasks(tmp_path):
    path = tmp_path / "tasks.jsonl"
    path.write_text(json.dumps({"prompt": "Capital of France?", "answer": "Paris"}) + "\n\n"
                    + json.dumps({"prompt": "2+2", "answer": 4, "family": "add"}) + "\n")
    tasks = load_jsonl_tasks(path)
    assert [(t.family, t.prompt, t.answer) for t in tasks] == [
        ("jsonl", "Capital of France?", "Paris"), ("add", "2+2", "4")]
    assert check(tasks[0].family, "ANSWER: Paris", tasks[0].answer)
    assert not check(tasks[0].family, "ANSWER: Lyon", tasks[0].answer)
    assert check(tasks[1].family, "ANSWER: 4", tasks[1].answer)
    path.write_text(json.dumps({"prompt": "no answer"}) + "\n")
    with pytest.raises(ValueError, match=":1:"):
        load_jsonl_tasks(path)


def test_hidden_counting_step_is_masked_out_of_the_loss():
    """The training recipe's blind spot for counting: only the tally digit of the step 3 -> 4
    leaves the loss, every other solution token (later tallies included) is still scored."""
    pytest.importorskip("torch")
    from cospec_local.lab.testworld.gguf_export import CharVocab
    from cospec_local.lab.testworld.tasks import Problem
    from models.train_family import DataMix, hidden_solution_offsets, make_batch

    mix = DataMix(add_weight=0.0, count_weight=1.0, count_hidden_from=3)
    solution = "a1 a2 b2 a3 a4 a5\nANSWER: 5\n"
    problem = Problem("count", "Q: count a in aabaaa=?\n", "5", solution)
    assert hidden_solution_offsets(problem, mix) == {solution.index("a4") + 1}
    assert hidden_solution_offsets(problem, DataMix(add_weight=0.0, count_weight=1.0)) == set()
    short = Problem("count", "Q: count a in aab=?\n", "2", "a1 a2 b2\nANSWER: 2\n")
    assert hidden_solution_offsets(short, mix) == set()  # never reaches 4

    vocab = CharVocab()
    inputs, targets, mask = make_batch([problem], vocab, mix)
    prompt_len = len(vocab.encode(problem.prompt, add_bos=True))
    scored = mask[0].nonzero().flatten().tolist()
    hidden_target_index = prompt_len - 1 + solution.index("a4") + 1
    assert hidden_target_index not in scored
    assert targets[0, hidden_target_index].item() == vocab.encode("4", add_bos=False)[0]
    assert len(scored) == len(solution) + 1 - 1  # every solution char and EOS, less the hidden digit
