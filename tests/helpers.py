"""Shared test helpers: tiny random checkpoints in the HF folder layout the engine loads."""
from __future__ import annotations

import os
import shutil
from collections import defaultdict
from dataclasses import dataclass, field

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")


def save_tiny_model(path: str | os.PathLike, arch: str = "llama", *,
                    tokenizer_dir: str | None = None, max_shard_size: str = "50GB",
                    seed: int = 0, **config_overrides) -> str:
    """Save a small random `LlamaForCausalLM` or `Qwen2ForCausalLM` as safetensors, with the
    SmolLM2 tokenizer files beside it (the engine needs one), and return the folder.

    Weights are drawn at a scale that spreads the logits over several units, so greedy argmax
    has clear winners (HF's own init, std 0.02, leaves near-ties that float noise flips), and
    every bias is non-zero (HF zero-initialises them, which would hide a bias left unloaded).
    Embeddings are untied (HF's default; pass tie_word_embeddings=True to tie them: such
    random models mostly repeat one token). A `max_shard_size` below the model's size gives
    several shards and an index json.
    """
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if tokenizer_dir is None:
        from tandem.loader.model_path import resolve_model

        tokenizer_dir = resolve_model("smollm2")
    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    if arch not in classes:
        raise ValueError(f"arch: expected one of {sorted(classes)}, got {arch!r}")
    config_cls, model_cls = classes[arch]
    settings = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 49152,
                "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "bos_token_id": 1,
                "eos_token_id": 2, "pad_token_id": 2}
    settings.update(config_overrides)
    config = config_cls(**settings)
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn_like(p))
            elif "embed_tokens" in name or "lm_head" in name:
                p.copy_(torch.randn_like(p))
            else:  # unit-variance activations through every projection
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
                if name.endswith(("o_proj.weight", "down_proj.weight")):
                    # Layers outweigh the residual embedding, else tokens tend to predict
                    # themselves and greedy output is one token repeated.
                    p.mul_(4)
    path = os.fspath(path)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    for name in TOKENIZER_FILES:
        src = os.path.join(tokenizer_dir, name)
        if os.path.isfile(src):
            shutil.copy(src, os.path.join(path, name))
    return path


@dataclass
class StepwiseRun:
    """What `run_stepwise` saw: per request (by the id given), the logits of every token it
    sampled, its output tokens, and its `num_computed_tokens` when first scheduled (a prefix
    cache hit shows here); per step, how many tokens each scheduled request computed."""
    logits: dict[str, list[torch.Tensor]] = field(default_factory=lambda: defaultdict(list))
    tokens: dict[str, list[int]] = field(default_factory=dict)
    computed_at_admission: dict[str, int] = field(default_factory=dict)
    steps: list[dict[str, int]] = field(default_factory=list)


def run_stepwise(engine, arrivals: dict[int, dict[str, list[int]]],
                 max_tokens: int) -> StepwiseRun:
    """Drive greedy requests through the engine's real scheduler, model runner and sampler one
    step at a time, keeping the logits. `arrivals` maps a step number to the requests
    (id -> prompt token ids) added just before that step."""
    from tandem import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    run, reqs, step = StepwiseRun(), {}, 0
    try:
        while step <= max(arrivals) or engine.scheduler.has_unfinished():
            for rid, ids in arrivals.get(step, {}).items():
                engine.add_request(rid, ids, params)
                reqs[f"0:{rid}"] = (rid, engine.scheduler.requests[f"0:{rid}"])
            sched = engine.scheduler.schedule()
            assert not sched.empty, f"step {step}: nothing scheduled"
            for r in sched.requests:
                run.computed_at_admission.setdefault(reqs[r.request_id][0], r.num_computed_tokens)
            run.steps.append({reqs[r.request_id][0]: n
                              for r, n in zip(sched.requests, sched.num_tokens)})
            sampling, logits = engine.runner.forward_logits(sched)
            sampled = {}
            if logits is not None:
                result = engine.runner.sampler(logits, sampling)
                for r, row, token in zip(sampling, logits, result.token_ids):
                    run.logits[reqs[r.request_id][0]].append(row.float().cpu().clone())
                    sampled[r.request_id] = [token]
            engine.scheduler.update(sched, sampled)
            step += 1
    finally:
        for rid, _ in reqs.values():
            engine.abort_request(rid)
    run.tokens = {rid: req.output_token_ids for rid, req in reqs.values()}
    return run
