"""GGUF -> HF checkpoint folder, so the engine loads one format only."""

import os
import sys


def convert_gguf(src: str, dest: str) -> None:
    """Dequantize `src` (a .gguf file) into `dest`: config.json, generation_config.json,
    tokenizer files with the chat template, and float32 model.safetensors."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(src))
    print(f"converting {src} -> {dest} (once)", file=sys.stderr, flush=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)

    os.makedirs(dest, exist_ok=True)
    # A plain float32 checkpoint as other tools read it (vLLM, llama.cpp's converter): it names
    # its architecture, and no longer claims the GGUF quantization it was loaded from.
    model.config.architectures = [type(model).__name__]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.save_pretrained(dest)
    model.generation_config.save_pretrained(dest)
    tokenizer.save_pretrained(dest)  # writes chat_template.jinja next to tokenizer_config.json
    # transformers 5 refuses save_pretrained on a GGUF-loaded model, so write the weights
    # ourselves; safetensors rejects shared storage, and a tied lm_head is rebuilt on load.
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    tensors = {k: v.detach().contiguous() for k, v in state.items()}
    save_file(tensors, os.path.join(dest, "model.safetensors"), metadata={"format": "pt"})
    from tandem.loader.gguf_quant import write_q4_sidecar

    write_q4_sidecar(src, dest, model.config)  # the 4-bit weights as stored, for --quantization
