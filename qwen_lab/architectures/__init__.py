"""The architectures qwen_lab implements, keyed by the name ``config.json`` gives in ``architectures``.

Each is one short file: the config fields it reads, and how one of its layers is put
together from the shared pieces of ``qwen_lab.layers``. Loading picks the class here by
name (``qwen_lab.load.architecture_of``) and needs to know nothing else about it.
"""
from ..layers import CausalLM
from .llama import LlamaConfig, LlamaForCausalLM
from .qwen2 import Qwen2Config, Qwen2ForCausalLM
from .qwen3 import Qwen3Config, Qwen3ForCausalLM

#: architecture name in config.json -> model class (its ``config_class`` reads the config)
ARCHITECTURES: dict[str, type[CausalLM]] = {
    cls.__name__: cls for cls in (Qwen2ForCausalLM, LlamaForCausalLM, Qwen3ForCausalLM)
}

__all__ = ["ARCHITECTURES", "LlamaConfig", "LlamaForCausalLM", "Qwen2Config", "Qwen2ForCausalLM", "Qwen3Config",
           "Qwen3ForCausalLM"]
