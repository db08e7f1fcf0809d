"""The qwen-vl kind trains on a stream (`data.streaming: true`): train.max_steps steps and a LoRA checkpoint."""

import json
from pathlib import Path

import pytest
from qwenvl_helpers import REPO

from medm.data.streaming import StreamingDataset
from medm.train.args import load_train_config
from medm.train.trainer import run_training

pytestmark = pytest.mark.slow


def test_qwenvl_run_training_streams_max_steps_and_saves(tmp_path, phantoms):
    records = json.loads(Path(phantoms["train"]).read_text())[:6]
    text = [{"id": f"t{i}", "conversations": [{"from": "human", "value": f"Is {i} even?"},
                                              {"from": "gpt", "value": "yes" if i % 2 == 0 else "no"}]}
            for i in range(6)]
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for pair in zip(records, text) for r in pair))
    cfg = load_train_config(str(REPO / "configs/train/finetune_qwenvl.yaml"), [
        f"model={REPO / 'configs/model/tiny-qwen2.5-vl.yaml'}", f"data.path={data}",
        f"data.image_dir={phantoms['image_dir']}", "data.max_length=128", "data.streaming=true",
        f"train.output_dir={tmp_path / 'run'}", "train.max_steps=4", "train.per_device_train_batch_size=4",
        "train.gradient_accumulation_steps=1", "train.bf16=false", "train.deepspeed=null", "train.device=cpu",
        "train.report_to=[]", "train.dataloader_num_workers=0", "train.logging_steps=1", "train.save_strategy=steps",
        "train.save_steps=4", "train.disable_tqdm=true", "train.gradient_checkpointing=false",
        "train.plot_loss=false", "train.train_sampling_strategy=auto"])
    trainer = run_training(cfg)
    assert isinstance(trainer.train_dataset, StreamingDataset)
    assert trainer.state.global_step == 4  # 12 records = 3 batches a pass: the 4th step starts a second pass
    assert (tmp_path / "run" / "checkpoint-4" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
