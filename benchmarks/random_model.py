"""Write a randomly initialised Llama checkpoint folder of a known shape, for speed runs where
the weights' values do not matter (GPU checks, tensor-parallel scaling).

    python benchmarks/random_model.py --shape smollm2 --tokenizer-from DIR --out DIR
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SHAPES = {
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 49152,
             "max_position_embeddings": 2048, "rope_theta": 10000.0,
             "tie_word_embeddings": True},
    "smollm2": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
                "max_position_embeddings": 8192, "rope_theta": 100000.0,
                "tie_word_embeddings": True},
    "llama-3.2-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                     "max_position_embeddings": 131072, "rope_theta": 500000.0,
                     "tie_word_embeddings": True},
}


def write_random_model(shape: str, out: str, tokenizer_from: str, seed: int = 0,
                       vocab_size: int | None = None, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32) -> str:
    """Write the checkpoint (and the tokenizer files of `tokenizer_from`) into `out`.

    `device`: where the weights are initialised: a 1B model's 1.2B normal draws take ~8 s on
    2 CPU cores (100M in 0.63 s) and a fraction of a second on a GPU (the values differ between
    devices for one seed; a speed run does not care). `dtype`: the saved files' (bfloat16 halves a 1B
    model's 5 GB of float32)."""
    cfg = dict(SHAPES[shape])
    if vocab_size:
        cfg["vocab_size"] = vocab_size
    torch.manual_seed(seed)
    # A wider init than HF's 0.02 keeps greedy choices away from float ties.
    config = LlamaConfig(**cfg, initializer_range=0.05, bos_token_id=1, eos_token_id=2,
                         pad_token_id=2)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)  # float32 draws, as on the CPU, then cast
    model.save_pretrained(out, safe_serialization=True)
    for f in glob.glob(os.path.join(tokenizer_from, "*token*")) + glob.glob(
            os.path.join(tokenizer_from, "*.jinja")):
        shutil.copy(f, out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    p.add_argument("--tokenizer-from", required=True, help="a folder with tokenizer files")
    p.add_argument("--out", required=True)
    p.add_argument("--vocab-size", type=int, default=None,
                   help="override (must cover the tokenizer's ids)")
    p.add_argument("--device", default="cpu", help="where to initialise the weights")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = p.parse_args()
    print(write_random_model(args.shape, args.out, args.tokenizer_from,
                             vocab_size=args.vocab_size, device=args.device,
                             dtype=getattr(torch, args.dtype)))


if __name__ == "__main__":
    main()
