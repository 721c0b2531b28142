import os

import numpy as np
import pytest

# Set before anything imports transformers / huggingface_hub: tests never touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """The default model as an HF folder; converted once into $TANDEM_CACHE (~/.cache/tandem)
    and reused by every later session."""
    from tandem.loader.model_path import resolve_model

    return resolve_model("smollm2")


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch) -> str:
    """An empty TANDEM_CACHE for tests that must not see (or pollute) the shared cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("TANDEM_CACHE", str(cache))
    return str(cache)


def _byte_level_alphabet() -> list[str]:
    # GPT-2's byte -> printable character table, so every byte has a token.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    rest = [b for b in range(256) if b not in printable]
    table = dict(zip(printable, printable)) | {b: 256 + i for i, b in enumerate(rest)}
    return [chr(table[b]) for b in range(256)]


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> str:
    """A real, 100 KB GGUF file: a 2-layer random Llama (Q8_0) with a byte-level BPE tokenizer
    and a ChatML template. Converts in ~2 s, where SmolLM2 takes ~45 s."""
    import gguf
    from gguf.quants import quantize

    path = str(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *_byte_level_alphabet(), "hi", "Ġh"]
    hidden, inter, layers, heads, kv_heads = 64, 128, 2, 4, 2
    head_dim = hidden // heads
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3] * 3 + [1] * (len(tokens) - 3))  # 3 = control (special) tokens
    w.add_token_merges(["h i", "Ġ h"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    rng = np.random.default_rng(0)

    def matrix(name: str, rows: int, cols: int) -> None:
        data = quantize(rng.standard_normal((rows, cols), dtype=np.float32) * 0.1,
                        gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    def norm(name: str) -> None:
        w.add_tensor(name, 1 + 0.1 * rng.standard_normal(hidden, dtype=np.float32))

    matrix("token_embd.weight", len(tokens), hidden)  # no output.weight: embeddings are tied
    for i in range(layers):
        norm(f"blk.{i}.attn_norm.weight")
        norm(f"blk.{i}.ffn_norm.weight")
        matrix(f"blk.{i}.attn_q.weight", hidden, hidden)
        matrix(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden)
        matrix(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden)
        matrix(f"blk.{i}.attn_output.weight", hidden, hidden)
        matrix(f"blk.{i}.ffn_gate.weight", inter, hidden)
        matrix(f"blk.{i}.ffn_up.weight", inter, hidden)
        matrix(f"blk.{i}.ffn_down.weight", hidden, inter)
    norm("output_norm.weight")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
