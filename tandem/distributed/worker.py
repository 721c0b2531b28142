"""A tensor-parallel rank other than 0: load this rank's shard, then run every step rank 0
broadcasts, until it says stop or goes away. Workers never schedule and never sample.

    python -m tandem.distributed.worker --rank R --local-rank L --config '<EngineConfig JSON>'
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time

from tandem.config import EngineConfig

logger = logging.getLogger("tandem.worker")


def _exit_with_parent(parent: int) -> None:
    """A local worker whose engine process died (even by SIGKILL) must not linger."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="tandem-parent-watch", daemon=True).start()


def run_worker(config: EngineConfig, rank: int, local_rank: int) -> int:
    import torch
    from transformers import AutoConfig

    from tandem.distributed import step
    from tandem.distributed.group import TPGroup, init_process_group, local_device
    from tandem.engine.model_runner import ModelRunner
    from tandem.kv_store.format import engine_model_id
    from tandem.kv_store.tiers import make_tiers
    from tandem.loader.model_path import resolve_model

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    device = local_device(config, local_rank)
    init_process_group(config, rank, device)
    folder = resolve_model(config.model)
    group = TPGroup(config)
    group.device = device
    hf_config = AutoConfig.from_pretrained(folder)
    runner = ModelRunner(config, hf_config, folder, group, device)
    tiers = make_tiers(config, runner, engine_model_id(hf_config.to_dict(), runner.quantization))
    try:
        while True:
            try:
                cmd, payload = step.receive(device)
            except Exception as e:  # noqa: BLE001 - rank 0 is gone or timed out: nothing to serve
                logger.error("rank %d: lost rank 0 (%s); exiting", rank, e)
                return 1
            if cmd == step.STOP:
                return 0
            if cmd == step.STEP:
                runner.run(payload)
            elif cmd == step.TIER_OPS:
                tiers.apply(payload)
            elif cmd == step.LOADED:
                group.all_reduce_min(tiers.op_loaded(*payload))
    finally:
        if tiers is not None:
            tiers.close()


def run_node(config: EngineConfig) -> int:
    """`tandem serve --node-rank R` with R > 0: this host's ranks, as workers only."""
    from tandem.distributed.group import spawn_local_workers

    first = config.node_rank * config.ranks_per_node
    others = spawn_local_workers(config, first + 1, config.ranks_per_node - 1)
    try:
        return run_worker(config, first, 0)
    finally:
        for p in others:
            p.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tandem.distributed.worker")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--local-rank", type=int, required=True)
    p.add_argument("--config", required=True, help="EngineConfig fields as a JSON object")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _exit_with_parent(os.getppid())
    return run_worker(EngineConfig(**json.loads(args.config)), args.rank, args.local_rank)


if __name__ == "__main__":
    sys.exit(main())
