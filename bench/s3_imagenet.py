"""What one student epoch of ImageNet-1k on 64 ranks x 10 workers reads from object storage, from the project's own
planner: who trains what (:mod:`pipeline.views.sampling`), the mix plans (a window's partners are read with it),
the shards' precise range reads (:func:`pipeline.data.shard_index.read_positions`) and the store's blocks
(:mod:`store.blocks`). Counted, not run: no image is decoded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from pipeline.core.config import AugConfig
from pipeline.data.shard_index import CHUNK_BYTES, gap_for
from pipeline.views.plan import epoch_plan
from pipeline.views.replay import piece_needs
from pipeline.views.sampling import runs, steps_per_epoch, worker_pieces

ROOT = Path(__file__).resolve().parent.parent
N_TRAIN = 1_281_167
SAMPLE_BYTES = 110_000
"""An ImageNet-1k training JPEG in its shard, on average (tar headers included)."""
ROW_BYTES = 27.5
"""Store bytes per (sample, epoch) at K = 10, C = 1,000 (``python -m bench store``; docs/benchmarks.md)."""
ENTRY_BYTES = 24
RANKS, WORKERS = 64, 10


def _range_requests(positions: np.ndarray, gap: int) -> tuple[int, int]:
    """(range requests, samples fetched) of a precise read of ``positions`` (the gap rule, ~32 MB a request)."""
    requests, fetched, i = 0, 0, 0
    while i < len(positions):
        j = i + 1
        while j < len(positions) and positions[j] - positions[j - 1] <= gap + 1:
            j += 1
        span = int(positions[j - 1] - positions[i] + 1)
        requests += -(-span * SAMPLE_BYTES // CHUNK_BYTES)
        fetched += span
        i = j
    return requests, fetched


def extrapolate(config: Path = ROOT / "configs" / "imagenet.yaml", epoch: int = 1) -> dict:
    """Per trained sample and as amplifications over one epoch's data, for ``config``'s layout on 64 x 10."""
    raw = yaml.safe_load(config.read_text())
    aug, size, batch = AugConfig.model_validate(raw["aug"]), raw["data"]["shard_size"], raw["student"]["batch_size"]
    ranges = [(a, min(a + size, N_TRAIN)) for a in range(0, N_TRAIN, size)]
    block = aug.window if size % aug.window == 0 else size
    plans: dict[int, object] = {}
    requests = fetched = store_rows = 0
    for rank in range(RANKS):
        for worker in range(WORKERS):
            for run in runs(worker_pieces(ranges, aug.window, 0, epoch, batch, rank, RANKS, worker, WORKERS)):
                s = run[0].window.shard
                plan = plans.setdefault(s, epoch_plan(aug, 0, epoch, s, *ranges[s]))
                pos = np.concatenate([p.window.first - ranges[s][0] + piece_needs(plan, p.window.first, p.lo, p.hi)
                                      for p in run])
                r, f = _range_requests(pos, gap_for(aug.window))
                lo, hi = run[0].window.first + run[0].lo, run[-1].window.first + run[-1].hi
                blocks = (hi - 1) // block - lo // block + 1
                requests += r + 1 + 1 + 3  # shard ranges, the shard's index, the block table, one per array
                fetched += f
                store_rows += blocks * block
    trained = steps_per_epoch(N_TRAIN, RANKS, batch) * RANKS * batch
    store_bytes = store_rows * ROW_BYTES + store_rows // block * 3 * ENTRY_BYTES
    return {"ranks": RANKS, "workers": WORKERS, "shard_size": size, "window": aug.window, "block": block,
            "trained": trained, "requests_per_sample": requests / trained,
            "store_amplification": store_bytes / (N_TRAIN * ROW_BYTES), "shard_amplification": fetched / N_TRAIN}
