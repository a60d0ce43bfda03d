"""Run by torchrun in tests/test_distributed.py: fit a small CNN on a Fashion-MNIST subset.

Usage: ddp_fit.py OUT_DIR POLICY [KILL_RANK | resume]
Each rank writes its final weights to OUT_DIR/rank{R}.safetensors. With KILL_RANK, that rank
dies (os._exit) in the middle of epoch 2; with `resume`, the run in OUT_DIR/run is continued.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from test_fit import small_cnn  # noqa: E402

import fxdrop  # noqa: E402
from fxdrop.data import build_data  # noqa: E402
from fxdrop.policies import parse_policy  # noqa: E402

out, policy = Path(sys.argv[1]), parse_policy(sys.argv[2])
mode = sys.argv[3] if len(sys.argv) > 3 else ""
kill_rank = int(mode) if mode.isdigit() else -1
rank = int(os.environ.get("RANK", "0"))


def on_event(kind, info):
    if rank == kill_rank and kind == "step" and info["epoch"] == 2 and info["step"] == 2:
        os._exit(3)


torch.set_num_threads(1)
bundle = build_data("fashion-mnist", 16, limit=512, seed=0)
model = small_cnn(len(bundle.classes))
res = fxdrop.fit(
    model,
    bundle.train,
    bundle.val,
    policy=policy,
    out_dir=out / "run",
    epochs=3,
    batch_size=32,
    lr=0.05,
    seed=0,
    on_event=on_event,
    dist_timeout_s=60,
    keep_cache=True,
    resume=mode == "resume",
)
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / f"rank{rank}.safetensors"))
print(f"rank {rank} done: final val acc {res.final_val_acc:.4f} cut {res.cut}")
