"""Display: DOT text (pure), Graphviz rendering, text progress and the live Jupyter view."""
