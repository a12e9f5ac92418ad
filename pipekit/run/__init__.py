"""The run layer: compile stages into one Dask graph, compute it, and emit stage events.

This is the only place that emits stage events; observers never hand anything back.
"""
