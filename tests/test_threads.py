"""medm._threads: the thread count `medm demo` picks by timing steps with 1 thread and with every core."""

import pytest
import torch

from medm import _threads
from medm._threads import ThreadChoice, choose_threads, pick_threads, step_timer
from medm.data.annotations import parse_record
from medm.data.collator import DataCollator
from medm.data.dataset import ConversationDataset
from medm.models import build_model
from medm.models.tiny import tiny_model_config


def fake(seconds: dict[int, list[float]]):
    """measure(n) that returns the next of `seconds[n]` and records the order of the calls."""
    calls = []

    def measure(n):
        calls.append(n)
        return seconds[n][sum(c == n for c in calls) - 1]

    return measure, calls


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_busy_cores_keep_one_thread_and_say_why():
    measure, calls = fake({1: [0.41, 0.40, 0.42], 2: [1.9, 2.0, 1.8]})
    choice = choose_threads(measure, cores=2, rounds=3, load=3.21)
    assert choice.threads == 1 and choice.seconds == {1: 0.41, 2: 1.9}
    assert calls == [1, 2]  # 2 is clearly (>= 2x) slower after one round: no more slow steps
    assert choice.describe() == "1 (measured 0.41 s/step vs 2: 1.90 s/step; load 3.2)"


def test_idle_cores_keep_every_core_interleaved_by_median():
    # One slow outlier for 4 threads (another job started) does not decide: medians do.
    measure, calls = fake({1: [0.33, 0.34, 0.33], 4: [0.21, 0.60, 0.22]})
    choice = choose_threads(measure, cores=4, rounds=3)
    assert calls == [1, 4, 4, 1, 1, 4]  # interleaved, the order alternating per round
    assert choice.threads == 4 and choice.seconds == {1: 0.33, 4: 0.22}
    assert choice.describe() == "4 (measured 0.22 s/step vs 1: 0.33 s/step)"


def test_more_threads_must_win_by_the_margin():
    measure, _ = fake({1: [1.0] * 3, 2: [0.97] * 3})  # 3% faster: within the noise of a few steps
    assert choose_threads(measure, cores=2).threads == 1
    measure, _ = fake({1: [1.0] * 3, 2: [0.9] * 3})
    assert choose_threads(measure, cores=2).threads == 2


def test_one_core_or_given_threads_measure_nothing(monkeypatch):
    def never(n):
        raise AssertionError("measured")

    assert choose_threads(never, cores=1) == ThreadChoice(1, "one core")
    built = []
    choice = pick_threads(3, lambda: built.append(1))
    assert choice.describe() == "3 (--threads)" and torch.get_num_threads() == 3 and not built
    monkeypatch.setattr(_threads, "available_cores", lambda: 1)
    assert pick_threads(None, lambda: built.append(1)).describe() == "1 (one core)" and not built


def test_real_training_step_is_timed_at_each_count():
    """A forward + backward of a tiny model on a real batch, at 1 and 2 threads: positive times, a choice made, the
    model's weights untouched (no optimizer step)."""
    torch.manual_seed(0)
    model, tok = build_model(tiny_model_config())
    records = [parse_record({"id": f"r{i}", "conversations": [{"from": "human", "value": "Is there a lesion?"},
                                                              {"from": "gpt", "value": "no"}]}, f"r{i}",
                            for_training=True) for i in range(4)]
    ds = ConversationDataset(records, tok, num_image_tokens=model.num_image_tokens, image_preprocess=None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    measure = step_timer(model, DataCollator(tok)([ds[i] for i in range(len(ds))]))
    choice = choose_threads(measure, cores=2, rounds=1)
    assert choice.threads in (1, 2) and set(choice.seconds) == {1, 2}
    assert all(s > 0 for s in choice.seconds.values())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
