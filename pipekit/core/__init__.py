"""The core: the typed spec, the DAG, targets, stage states and events, the run's outcome.

Plain data and the standard library only (OmegaConf where a DictConfig is read): nothing
here knows Dask, MLflow or Jupyter.
"""
