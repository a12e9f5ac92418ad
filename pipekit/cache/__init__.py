"""The stage cache: fingerprints, the atomic verified store, and the planner that says
what runs and why."""
