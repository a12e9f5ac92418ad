"""Example stage functions used by the shipped pipelines in `conf/pipeline/`."""
