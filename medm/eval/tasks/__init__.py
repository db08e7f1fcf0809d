"""Evaluation tasks, one benchmark or kind of task per file, registered by name in `medm.registry.TASK`
(`medm eval --task NAME`, `medm list`); `medm.registry` imports every public module of this folder at first lookup.

- `vqa`: closed / open VQA on any predictions file with answers; `vqa-rad`, `slake`, `pathvqa`: the same scoring,
  plus a reader of each benchmark's published file (`medm infer --layout NAME`) and its own breakdowns and notes.
- `report`: report generation (ROUGE, BLEU). `grounding`: box answers (IoU, Acc@0.5). `spine`: the lumbar spine
  MRI tasks of `medm data build spine`.
- Multiple choice, scored by each benchmark's own rule (`medm.eval.choice`): `omnimedvqa`, `pmc-vqa`, `medxpertqa`,
  `mmmu`, `m3d-vqa-closed`. Text: `iu-xray`, `report-zh` (by character), `m3d-vqa-open`, `m3d-cap`. `flare25`.
"""

from medm.eval.tasks._base import Breakdown, Column, Task, TaskError

__all__ = ["Breakdown", "Column", "Task", "TaskError"]
