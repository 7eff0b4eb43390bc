"""flap-exp: FLAP structured pruning of LLaMA-family models.

Importing the package registers the `flap_llama` config/model type, so a pruned directory loads with
`transformers.AutoModelForCausalLM.from_pretrained(dir)`.
"""
from . import modeling  # noqa: F401

__version__ = "0.1.0"
