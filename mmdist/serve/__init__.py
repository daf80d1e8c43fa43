"""From the registry to users: the MLflow pyfunc, pull, predict."""
