"""qwen-lab: how a chat LLM turns a conversation into text, built from Qwen2.5-Instruct's own files.

One module per step of the walkthrough, each depending only on the ones before:

    hub            1. download the model files (or find them in a folder / the embedded model)
    model, load    2. the Qwen2 network in plain PyTorch; config.json -> architecture -> weights
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
from .errors import (CheckpointError, ContextTooLongError, DownloadError, QwenLabError, TemplateError,
                     UnsupportedArchitectureError)
from .generation import ChatModel, GenerationConfig, GenerationResult, GenerationStream, generate_stream
from .hub import EMBEDDED_MODEL_ID, ModelFiles, resolve
from .load import ARCHITECTURES, load_model
from .model import Qwen2Config, Qwen2ForCausalLM
from .tokenizer import StreamDecoder, Tokenizer

__version__ = "0.1.0"

__all__ = [
    "ARCHITECTURES", "EMBEDDED_MODEL_ID", "ChatModel", "ChatTemplate", "CheckpointError", "ContextTooLongError",
    "DownloadError", "GenerationConfig", "GenerationResult", "GenerationStream", "ModelFiles", "Qwen2Config",
    "Qwen2ForCausalLM", "QwenLabError", "StreamDecoder", "TemplateError", "Tokenizer",
    "UnsupportedArchitectureError", "generate_stream", "load_model", "resolve",
]
