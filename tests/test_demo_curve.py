"""`medm demo` prints the finetune stage's validation curve (step -> validation loss and accuracy) with its table."""

import json

from medm.demo import format_curve, print_table, validation_curve

CURVE = [{"step": 300, "eval_loss": 0.9123, "eval_closed_accuracy": 75.0, "eval_overall": 50.0, "eval_n": 100},
         {"step": 600, "eval_loss": 0.4567, "eval_closed_accuracy": 92.5, "eval_open_accuracy": 80.0,
          "eval_overall": 86.25, "eval_n": 100}]


def test_curve_lines_show_each_evaluation_with_accuracies_as_fractions():
    lines = format_curve(CURVE)
    assert lines[0].split() == ["step", "val", "loss", "closed", "acc", "open", "acc", "overall"]
    assert lines[1].split() == ["300", "0.912", "0.750", "-", "0.500"]  # no open question that time
    assert lines[2].split() == ["600", "0.457", "0.925", "0.800", "0.863"]
    assert format_curve([]) == []
    # Only the columns some evaluation logged (a run without eval_task has the loss alone).
    assert format_curve([{"step": 5, "eval_loss": 1.0}]) == [f"{'step':>6} {'val loss':>10}", f"{5:>6} {1.0:>10.3f}"]


def test_curve_is_read_from_the_runs_results_and_printed_with_the_table(tmp_path, capsys):
    run = tmp_path / "finetune"
    run.mkdir()
    assert validation_curve(str(run)) == []  # a run that did not evaluate
    (run / "results.json").write_text(json.dumps({"global_step": 600, "curve": CURVE}))
    curve = validation_curve(str(run))
    assert curve == CURVE
    results = {"per_kind": {"presence": {"n": 4, "accuracy": 1.0, "majority_baseline": 0.5, "blanked_accuracy": 0.5}},
               "n_test": 4, "accuracy": 1.0, "majority_baseline": 0.5, "blanked_accuracy": 0.5, "train_seconds": 9.0,
               "checkpoint": str(run)}
    print_table(results, str(tmp_path), curve)
    printed = capsys.readouterr().out
    table_end = printed.index("\noverall ")
    curve_at = printed.index("validation during finetuning (100 questions")
    assert table_end < curve_at < printed.index("checkpoint:")
    assert "\n".join(format_curve(CURVE)) in printed
