"""MLflow tracking: settings, the one tag schema, the client calls, the run observer,
model flavours and lineage. MLflow itself is imported only where it is called."""
