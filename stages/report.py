"""DVC stage `report`: every evaluation in one table laid out like the paper's Table 1, the measurements beyond
Rouge-L, the cost per method, the compute-matched table, the paper comparison and the plots (pipeline/report.py),
into --out.

Its inputs are exactly the outputs of the stages dvc.yaml defines now (pipeline/dvc_stages.py), never whatever
else lies in the directories it is given: a removed student or seed leaves nothing stale in the report.
"""

import argparse
from pathlib import Path

from pipeline.config import exit_on_user_error, load_params
from pipeline.dvc_stages import current_outputs, declaration
from pipeline.report import REPORT_FILES, EvalMetrics, TrainingMetrics, write_report
from pipeline.tracking import StageRun, ui_address


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--eval-metrics", required=True, help="the directory of the evaluate stages' metrics files")
    parser.add_argument("--predictions", required=True, help="the directory of the evaluate stages' predictions")
    parser.add_argument("--init-metrics", required=True, help="the directory of init_student's metrics files")
    parser.add_argument("--distill-metrics", required=True, help="the directory of the distill stages' metrics files")
    parser.add_argument("--teacher-metrics", required=True, help="train_teacher's metrics file")
    parser.add_argument("--generate-metrics", required=True, help="teacher_generate's metrics file")
    parser.add_argument("--init-plots", required=True, help="the directory of init_student's training curves")
    parser.add_argument("--distill-plots", required=True, help="the directory of the distill stages' training curves")
    parser.add_argument("--budget-metrics", required=True,
                        help="the directory of the compute-matched checkpoints' metrics files (compute_matched.md)")
    parser.add_argument("--budget-predictions", required=True, help="the directory of their predictions")
    parser.add_argument("--out", required=True, help="the report directory to write")
    arguments = parser.parse_args()
    params = load_params()
    with StageRun("report", declaration("report").params) as run:
        evaluations = [EvalMetrics.read(path) for path in current_outputs(arguments.eval_metrics)]
        training = TrainingMetrics(init_student=Path(arguments.init_metrics), distill=Path(arguments.distill_metrics),
                                   train_teacher=Path(arguments.teacher_metrics),
                                   teacher_generate=Path(arguments.generate_metrics))
        markdown = write_report(params, evaluations, current_outputs(arguments.init_plots),
                                current_outputs(arguments.distill_plots), training, Path(arguments.predictions),
                                Path(arguments.out),
                                [EvalMetrics.read(path) for path in current_outputs(arguments.budget_metrics)],
                                Path(arguments.budget_predictions))
        for name in REPORT_FILES:
            run.log_artifact(Path(arguments.out) / name)
        print(markdown)
        if run.experiment_id is not None:
            print(f"MLflow: `mlflow ui --backend-store-uri {run.uri}`, then open {ui_address(run.experiment_id)}")


if __name__ == "__main__":
    exit_on_user_error(main)
