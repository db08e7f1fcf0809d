"""python tests/robustness/crash_worker.py SPEC_JSON: one tiny training run in a fresh process, to be killed.

SPEC_JSON: {"out": dir, "data": train.json, "train": {...}, "hang_in_save_at": N, "marker": path}. With
`hang_in_save_at`, the save of checkpoint-N stops half-way (model weights written, RNG state and trainer state not)
after writing `marker`, and waits there to be killed.
"""

import json
import sys
import time
from pathlib import Path


def main() -> None:
    spec = json.loads(sys.argv[1])
    from train_helpers import make_cfg

    from medm.train.trainer import MedMTrainer, run_training

    hang_at = spec.get("hang_in_save_at")
    if hang_at is not None:
        save_rng_state = MedMTrainer._save_rng_state

        def hang(self, output_dir):
            save_rng_state(self, output_dir)
            if self.state.global_step == hang_at:
                Path(spec["marker"]).write_text(output_dir)
                time.sleep(600)

        MedMTrainer._save_rng_state = hang
    run_training(make_cfg(Path(spec["out"]), Path(spec["data"]), spec.get("stage"), **spec.get("train", {})))


if __name__ == "__main__":
    main()
