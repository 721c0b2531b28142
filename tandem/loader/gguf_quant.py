"""A GGUF's quantized weights kept as stored: `quant-gguf.safetensors` beside the converted
float32 folder holds, for every Q4_0/Q4_1 projection under its HF name, the 4-bit codes (two a
byte: element 2j in the low nibble, 2j + 1 in the high one), and per group of 32 a scale and a
zero (w = (code - 8) * scale + zero); for a Q8_0 embedding or LM head, its int8 codes and per-32
scales (w = code * scale). All read straight from the file's blocks, not requantized.
Parameters' own weight loaders shard these like the weights they stand for."""
from __future__ import annotations

import os

import torch

from tandem.quantization.gguf_q4 import BLOCK as GROUP  # a Q4_0/Q4_1 block is one group
from tandem.quantization.gguf_q4 import SUPPORTED, q4_codes
from tandem.quantization.q8_0 import q8_0_codes

QUANT_FILE = "quant-gguf.safetensors"
# GGUF name -> HF prefix of the tensors kept at 8 bits when the file has them in Q8_0
VOCAB_TENSORS = {"token_embd.weight": "model.embed_tokens", "output.weight": "lm_head"}


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """[N, K] uint8 codes 0..15 -> [N, K // 2], element 2j low."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)


def hf_row_order(name: str, rows: int, config) -> torch.Tensor | None:
    """llama.cpp's converter interleaves the rows of q and k for its RoPE; transformers undoes it
    when it reads the file (as here: HF row r is GGUF row order[r]). None: rows as stored."""
    if ".attn_q." in name:
        heads = config.num_attention_heads
    elif ".attn_k." in name:
        heads = config.num_key_value_heads
    else:
        return None
    return torch.arange(rows).reshape(heads, rows // heads // 2, 2).transpose(1, 2).reshape(-1)


def write_q4_sidecar(src: str, dest: str, config) -> None:
    """Write QUANT_FILE for the Q4_0/Q4_1 projections and the Q8_0 embedding / LM head of
    `src`. Tensors of other types are served from the float32 folder."""
    import gguf
    from safetensors.torch import save_file

    reader = gguf.GGUFReader(src)
    field = reader.fields["general.architecture"]
    arch_name = bytes(field.parts[field.data[0]]).decode()
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    to_hf = {}
    for i in range(config.num_hidden_layers):
        for hf in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            to_hf[names.get_name(f"model.layers.{i}.{hf}") + ".weight"] = f"model.layers.{i}.{hf}"
    out, unsupported = {}, []
    for t in reader.tensors:
        vocab = VOCAB_TENSORS.get(t.name)
        if vocab and t.tensor_type.name == "Q8_0":
            k, n = (int(d) for d in t.shape)
            codes, scale = q8_0_codes(t.name, t.data, (n, k))
            out |= {f"{vocab}.q8codes": codes.contiguous(), f"{vocab}.q8scale": scale.contiguous()}
            continue
        if t.name not in to_hf or t.tensor_type.name in ("F32", "F16", "BF16"):
            continue
        if t.tensor_type.name not in SUPPORTED:
            unsupported.append(f"{t.name} ({t.tensor_type.name})")
            continue
        k, n = (int(d) for d in t.shape)  # GGUF lists dims innermost first
        codes, scale, zero = q4_codes(t.name, t.data, t.tensor_type, (n, k))
        order = hf_row_order(t.name, n, config) if arch_name == "llama" else None
        if order is not None:
            codes, scale, zero = codes[order], scale[order], zero[order]
        prefix = to_hf[t.name]
        out |= {f"{prefix}.qcodes": pack_nibbles(codes).contiguous(),
                f"{prefix}.qscale": scale.contiguous(), f"{prefix}.qzero": zero.contiguous()}
    if out or unsupported:  # the loader names what it cannot serve at 4 bits
        save_file(out, os.path.join(dest, QUANT_FILE),
                  metadata={"group_size": str(GROUP), "unsupported": ", ".join(unsupported)})


def check_supported(path: str) -> None:
    """Raise if the GGUF held quantized projections of types not served at 4 bits."""
    from safetensors import safe_open

    with safe_open(path, framework="pt", device="cpu") as f:
        unsupported = (f.metadata() or {}).get("unsupported")
    if unsupported:
        raise ValueError(f"quantization: 'gguf' serves Q4_0 and Q4_1 weights as stored; this "
                         f"file also has {unsupported} (use quantization 'none' to serve it "
                         f"dequantized)")
