"""What operators and developers run: the cbmir command line, serve, demo, reindex, evaluate."""
