"""Serving: the inference DAG of the `serve` section as one MLflow model.

- `export`: pins the stage model versions, logs the DAG as one pyfunc registered as
  `<pipeline>.serving` (signature from `serve.example`), moves its alias.
- `server`: MLflow's scoring protocol on uvicorn, following an alias with hot reload.
- `batch`: scores a CSV/Parquet file by Dask partitions with the same model.

Nothing here is imported by `import pipekit`; MLflow, Starlette and Dask load on use.
"""
