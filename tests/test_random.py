import torch

from bir.random import choice, randn, sample_generators, sample_seed, uniform


def test_per_sample_draws_do_not_depend_on_batch():
    together = randn((3, 4), sample_generators(7, [0, 1, 2]))
    alone = randn((3, 4), sample_generators(7, [1]))
    assert torch.equal(together[1], alone[0])
    assert not torch.equal(together[0], together[1])


def test_streams_and_seeds_differ():
    assert sample_seed(0, 1) != sample_seed(0, 2) != sample_seed(1, 1)
    assert sample_seed(0, 1, stream=1) != sample_seed(0, 1, stream=0)


def test_uniform_and_choice_ranges():
    g = sample_generators(0, [0])[0]
    xs = [uniform(g, 2.0, 3.0) for _ in range(200)]
    assert min(xs) >= 2.0 and max(xs) < 3.0
    picks = [choice(g, ["a", "b"], [0.0, 1.0]) for _ in range(50)]
    assert set(picks) == {"b"}
    freq = sum(choice(g, [0, 1], [0.25, 0.75]) for _ in range(2000)) / 2000
    assert abs(freq - 0.75) < 0.05
