"""The gradient-alignment test case, shared by tests/test_grad_align.py and its ranks.

Run as a script under ``accelerate launch --multi_gpu --num_processes N tests/grad_align_case.py OUT``:
each rank trains every case of ``MULTI_CASES`` through the product's ``train_step`` on its
contiguous slice of each global batch, and rank 0 saves the parameters to OUT.
"""

import sys

import torch

K, B, STEPS = 5, 8, 3
SETTINGS = dict(
    data="digits",
    method="dhkd",
    kd_loss="binary_kl_norm",
    alpha=0.7,
    gamma=1.3,
    temperature=2.0,
    lr=0.1,
    momentum=0.9,
    weight_decay=5e-4,
    kernels="torch",
    precision="no",
)
MULTI_CASES = [("linear", True), ("nonlinear", True), ("linear", False)]


def build_model(aux_head: str, seed: int = 0, dtype=torch.float64):
    """resnet8 dual head (float64 unless told), dropout off (p = 0), same weights for every caller."""
    from dhkd_pipe.models import create_model

    torch.manual_seed(seed)
    model = create_model("resnet8", K, dual_head=True, aux_head=aux_head).to(dtype)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def batches(seed: int = 13):
    """STEPS batches of (images, labels, teacher logits), float64. The teacher ranks the label last,
    so head 2's distillation gradient pulls against head 1's cross-entropy; with this seed every
    case (linear/non-linear head, batch-norm in train/eval mode) has steps where <g2, g1> < 0 and
    steps where it is not, so both branches of the projection are exercised."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(STEPS):
        x = torch.randn(B, 3, 32, 32, generator=g, dtype=torch.float64)
        y = torch.randint(0, K, (B,), generator=g)
        t = torch.randn(B, K, generator=g, dtype=torch.float64) - 6.0 * torch.nn.functional.one_hot(y, K).double()
        out.append((x, y, t))
    return out


def product_run(
    accelerator, aux_head: str, grad_align: bool, steps, bn_eval: bool = False, dtype=torch.float64
) -> dict:
    """Trains through ``dhkd_pipe.training.engine.train_step``; returns the final state dict (cpu)."""
    from dhkd_pipe.config import TrainConfig
    from dhkd_pipe.data.loader import Batch
    from dhkd_pipe.methods.registry import from_config
    from dhkd_pipe.training.engine import train_step
    from dhkd_pipe.training.run import Run

    cfg = TrainConfig(aux_head=aux_head, grad_align=grad_align, **SETTINGS).validate()
    model = build_model(aux_head, dtype=dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    if bn_eval:  # per-sample gradients independent of the batch split (no batch statistics)
        model.eval()
    run = Run(cfg, accelerator, from_config(cfg), model, optimizer)
    for x, y, t in steps:
        d = accelerator.device
        train_step(run, Batch(x.to(d), y.to(d), t.to(d)), epoch=0)
    return {k: v.detach().cpu().clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}


def main(out: str):
    from dhkd_pipe.training.accelerator import make_accelerator

    acc = make_accelerator("no")
    world, rank = acc.num_processes, acc.process_index
    share = B // world
    local = [
        (
            x[rank * share : (rank + 1) * share],
            y[rank * share : (rank + 1) * share],
            t[rank * share : (rank + 1) * share],
        )
        for x, y, t in batches()
    ]
    results = {f"{aux}-{align}": product_run(acc, aux, align, local, bn_eval=True) for aux, align in MULTI_CASES}
    if acc.is_main_process:
        torch.save({"world": world, "results": results}, out)
    acc.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
