"""Evaluation of dense and pruned models: zero-shot accuracy (lm-eval) and throughput/memory/size."""
from .throughput import compare_throughput, model_size
from .zeroshot import evaluate_zeroshot

__all__ = ["compare_throughput", "evaluate_zeroshot", "model_size"]
