"""The tasks: the registry of what a task is (registry.py), tasks of the user's own (user_tasks.py), the task file
readers and batches (data.py, data_settings.py), the metrics and the overall score (metrics.py), prediction and
the prediction files (predict.py, predict_input.py), and bootstrap intervals for evaluate.py (significance.py).

``minbert.tasks`` was the registry's module before these folders: its names (``TASKS``, ``TaskSpec``,
...) are re-exported here.
"""
from minbert.tasks.registry import (DEFAULT_TASKS, HEAD_ORDER, LEADERBOARD_TASKS, METRIC_RANGES, OVERALL,
                                    OVERALL_RANGE, TASKS, TaskSpec, get_task, head_order, register_user_tasks,
                                    tasks_of_method)

__all__ = ["DEFAULT_TASKS", "HEAD_ORDER", "LEADERBOARD_TASKS", "METRIC_RANGES", "OVERALL", "OVERALL_RANGE", "TASKS",
           "TaskSpec", "get_task", "head_order", "register_user_tasks", "tasks_of_method"]
