import json
import os

import torch

from tandem.loader.gguf import convert_gguf


def test_convert_matches_gguf_model(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest = str(tmp_path / "hf")
    convert_gguf(tiny_gguf, dest)
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "chat_template.jinja"} <= set(os.listdir(dest))
    with open(os.path.join(dest, "config.json")) as f:
        config = json.load(f)
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config  # the weights are plain float32 now

    folder, name = os.path.split(tiny_gguf)
    reference = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    converted = AutoModelForCausalLM.from_pretrained(dest)
    assert converted.config.tie_word_embeddings
    ids = torch.tensor([[1, 7, 40, 90, 2]])
    with torch.no_grad():
        assert torch.equal(converted(ids).logits, reference(ids).logits)

    gguf_tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tokenizer = AutoTokenizer.from_pretrained(dest)
    text = "hi hi, <|im_end|> ünïcode"
    assert tokenizer(text).input_ids == gguf_tokenizer(text).input_ids
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.eos_token == "<|im_end|>"


def test_resolve_converts_a_gguf_path_once(tiny_gguf, tmp_cache, capsys):
    from tandem.loader.model_path import resolve_model

    folder = resolve_model(tiny_gguf)
    assert "(once)" in capsys.readouterr().err
    assert resolve_model(tiny_gguf) == folder
    assert capsys.readouterr().err == ""
    assert folder.startswith(os.path.join(tmp_cache, "gguf", "tiny-llama-"))
