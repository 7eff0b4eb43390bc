"""The study's artifacts: where each lives (paths), how it is written and read back with its checks."""
