"""What the study shows: tables, figures, noise, the summary and the MLflow runs."""
