"""Hand a pipeline to other systems: schedules (`schedule.py`) and Airflow DAG files
(`airflow.py`, the `pipekit export airflow` command). Top layer: imports anything below."""
