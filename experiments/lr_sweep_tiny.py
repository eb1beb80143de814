"""Peak learning rate of tiny pretraining: final train / eval loss per lr.

    python scripts/sweep.py experiments/lr_sweep_tiny.py --root runs/sweeps/lr_sweep_tiny --workers 2

Five runs of configs/pretrain.py:tiny (built-in corpus, 20 steps, about half a minute each on CPU),
lr from 3e-4 to 3e-2 on a log grid. The summary plots final loss against lr (log axis) and each run's
loss curve. At this length a larger lr wins up to about 1e-2 (train loss ≈ 4.25 nats/token against
5.8 at 3e-4); 3e-2 is no better and its eval loss is higher. Add `seed=[0, 1, 2]` to the product
for error bars.
"""

from experiments import product

BASE = "configs/pretrain.py:tiny"
SWEEP = product({"optim.lr": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2]})
COLUMNS = ("train/loss", "eval/loss", "train/grad_norm")
