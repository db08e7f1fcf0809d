"""How many CPU threads torch should use on this machine as it is now: measured, not assumed.

On idle cores more threads are faster; on cores that other jobs keep busy, OpenMP's spin-waiting makes every extra
thread wait for a core and a step can run 10x slower than on one thread. `choose_threads` times a few steps with 1
thread and with every core, interleaved (1, N, N, 1, 1, N: neither count gains by running while the machine is
quieter), and keeps the faster. `medm demo` uses it when `--threads` is not given.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from medm.models import build_model
from medm.train.args import TrainConfig
from medm.train.trainer import build_training_data

# All cores are kept only when their median step is at least this much faster than one thread's: a few steps are
# a small sample, and one thread leaves the other cores to the machine's other work.
MARGIN = 0.95
# Stop measuring after a round in which one count's median is this many times the other's: the answer is clear, and
# on busy cores each step with every thread can take many seconds.
CLEAR = 2.0


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


@dataclass
class ThreadChoice:
    """A thread count and why: `given` (--threads), `one core`, or `measured` (median seconds per step by count)."""

    threads: int
    reason: str
    seconds: dict[int, float] = field(default_factory=dict)
    load: float | None = None

    def describe(self) -> str:
        """e.g. `1 (measured 0.41 s/step vs 2: 1.90 s/step; load 3.2)`."""
        if self.reason != "measured":
            return f"{self.threads} ({self.reason})"
        others = ", ".join(f"{n}: {s:.2f} s/step" for n, s in self.seconds.items() if n != self.threads)
        load = "" if self.load is None else f"; load {self.load:.1f}"
        return f"{self.threads} (measured {self.seconds[self.threads]:.2f} s/step vs {others}{load})"


def choose_threads(measure: Callable[[int], float], cores: int, rounds: int = 3,
                   load: float | None = None) -> ThreadChoice:
    """Time `measure(n)` (seconds of one step on n threads) for n = 1 and n = `cores`, up to `rounds` times each,
    alternating which goes first (stopping early once one is `CLEAR`ly slower); keep `cores` only if its median
    beats one thread's by `MARGIN`."""
    if cores <= 1:
        return ThreadChoice(1, "one core", load=load)
    counts = [1, cores]
    times: dict[int, list[float]] = {n: [] for n in counts}
    for r in range(rounds):
        for n in counts if r % 2 == 0 else counts[::-1]:
            times[n].append(float(measure(n)))
        median = {n: statistics.median(v) for n, v in times.items()}
        if max(median.values()) >= CLEAR * min(median.values()):
            break
    best = cores if median[cores] < MARGIN * median[1] else 1
    return ThreadChoice(best, "measured", median, load)


def step_timer(model: torch.nn.Module, batch: dict) -> Callable[[int], float]:
    """measure(n) for `choose_threads`: seconds of one forward + backward of `model` on `batch` with n torch
    threads (the first call at each count runs one untimed step: allocations and OpenMP's pool start)."""
    model.train()
    warm: set[int] = set()

    def step() -> None:
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)

    def measure(n: int) -> float:
        torch.set_num_threads(n)
        if n not in warm:
            step()
            warm.add(n)
        t = time.perf_counter()
        step()
        return time.perf_counter() - t

    return measure


def training_step_timer(cfg: TrainConfig) -> Callable[[int], float]:
    """`step_timer` on the model of `cfg` (random init) and its first training batch (the `data:` section's
    records at `train.per_device_train_batch_size`)."""
    model, tokenizer = build_model(cfg.model)
    dataset, collator = build_training_data(cfg, model, tokenizer)
    size = min(len(dataset), cfg.train.per_device_train_batch_size)
    return step_timer(model, collator([dataset[i] for i in range(size)]))


def pick_threads(threads: int | None, cfg: Callable[[], TrainConfig], rounds: int = 3) -> ThreadChoice:
    """Set torch's thread count: `threads` when given, else the faster of 1 and every core on a few training steps
    of `cfg()` (built only when measuring). Returns the choice, for the caller to print."""
    cores = available_cores()
    if threads:
        choice = ThreadChoice(threads, "--threads")
    elif cores <= 1:
        choice = ThreadChoice(1, "one core")
    else:
        choice = choose_threads(training_step_timer(cfg()), cores, rounds, load_average())
    torch.set_num_threads(choice.threads)
    return choice
