"""qwen-lab: how a chat LLM turns a conversation into text, built from Qwen2.5-Instruct's own files.

One module per step of the walkthrough, each depending only on the ones before:

    hub            1. download the model files (or find them in a folder / the embedded model)
    layers,        2. the network's pieces in plain PyTorch, and the architectures built from them
    architectures     (Qwen2, Llama, Qwen3)
    load, runtime     config.json -> architecture -> weights; this machine's faster twins
    tokenizer         text <-> ids, streaming without broken characters
    chat_template  3. messages -> prompt text, with the model's own Jinja template
    generation     4. logits -> tokens -> text, stopping on the EOS ids of generation_config.json
    panel, cli        the chat panel for notebooks; the ``qwen-lab`` command

>>> import qwen_lab
>>> chat = qwen_lab.ChatModel.load("qwen-lab/tiny-chat")
>>> chat.generate([{"role": "user", "content": "What is the capital of France?"}], do_sample=False).text
'The capital of France is Paris.'
"""
from .chat_template import ChatTemplate
from .errors import (CheckpointError, ContextTooLongError, DownloadError, NumericalError, QwenLabError, SettingError,
                     TemplateError, UnsupportedArchitectureError)
from .generation import ChatModel, GenerationConfig, GenerationResult, GenerationStream, PromptCache, generate_stream
from .hub import EMBEDDED_MODEL_ID, ModelFiles, resolve
from .architectures import (ARCHITECTURES, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                            Qwen3ForCausalLM)
from .load import load_model
from .tokenizer import StreamDecoder, Tokenizer

__version__ = "0.1.0"

__all__ = [
    "ARCHITECTURES", "EMBEDDED_MODEL_ID", "ChatModel", "ChatTemplate", "CheckpointError", "ContextTooLongError",
    "DownloadError", "GenerationConfig", "GenerationResult", "GenerationStream", "LlamaConfig", "LlamaForCausalLM",
    "ModelFiles", "NumericalError", "PromptCache", "Qwen2Config", "Qwen2ForCausalLM", "Qwen3Config", "Qwen3ForCausalLM",
    "QwenLabError", "SettingError", "StreamDecoder", "TemplateError", "Tokenizer",
    "UnsupportedArchitectureError", "generate_stream", "load_model", "resolve",
]
