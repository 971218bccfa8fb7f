"""Benchmark of the fused DHKD loss (forward + backward) against the published eager code and
torch.compile of it: median time, peak memory and achieved bandwidth per (B, K, dtype).

    python benchmarks/kernels.py [--sizes B,K,dtype[,teacher_dtype] ...] [--kd-loss NAME]
                            [--json FILE] [--plot FILE] [--reps N] [--no-compile]

Methods: "fused" (one Triton launch, ``fused_dhkd_loss``); "eager published" (CE plus BinaryKL
computed as the published DHKD code does: clamped sigmoid, log, KLDivLoss, separate ops);
"compiled published" (torch.compile of that function); "torch reference"
(``dhkd_pipe.methods.losses.dhkd_loss`` with backend "torch", the stable form). Achieved bandwidth =
(bytes of both heads, teacher and labels read + both gradients written) / time, against a
measured device-to-device copy (2 x bytes / time). Without a GPU the fused kernel cannot be timed
(the Triton interpreter is not a benchmark): the PyTorch paths run on CPU at small sizes, peak
memory is not measured, and the header says so.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from dhkd_pipe.benchmarks.measure import clock, machine, median_seconds, print_table, write_results
from dhkd_pipe.methods import losses

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8}
GPU_SIZES = ["256,1000,fp32", "256,1000,bf16", "8192,32000,bf16"]
CPU_SIZES = ["64,100,fp32", "256,1000,fp32", "256,1000,bf16"]
T, ALPHA, GAMMA = 4.0, 1.0, 1.0
COLUMNS = [
    ("B", "B", "d"),
    ("K", "K", "d"),
    ("dtype", "dtype", "s"),
    ("method", "method", "s"),
    ("median_ms", "ms", ".3f"),
    ("peak_mem_MB", "peak MB", ".1f"),
    ("GBps", "GB/s", ".2f"),
    ("pct_of_copy", "% copy", ".1f"),
]


def published_dhkd(
    h1, h2, teacher, target, temperature=T, alpha=ALPHA, gamma=GAMMA, kd_loss="binary_kl_norm", eps=1e-8
):
    """CE + BinaryKL(-norm) as the published DHKD code computes them (clamped sigmoid, log, KLDivLoss)."""
    ce = F.cross_entropy(h1, target)
    crit = torch.nn.KLDivLoss(reduction="none")
    if kd_loss == "binary_kl_norm":
        q = torch.clamp(torch.sigmoid((h2 - teacher) / temperature), min=eps, max=1 - eps)
        p = torch.full_like(q, 0.5)
    else:
        q = torch.clamp(torch.sigmoid(h2 / temperature), min=eps, max=1 - eps)
        p = torch.clamp(torch.sigmoid(teacher / temperature), min=eps, max=1 - eps)
    kl = crit(torch.log(q), p) + crit(torch.log(1 - q), 1 - p)
    return gamma * ce + alpha * temperature**2 * kl.sum() / h2.shape[0]


def reference_dhkd(h1, h2, teacher, target, kd_loss="binary_kl_norm"):
    return losses.dhkd_loss(
        h1, h2, teacher, target, temperature=T, alpha=ALPHA, gamma=GAMMA, kd_loss=kd_loss, backend="torch"
    )


def copy_bandwidth(dev, nbytes):
    """Device-to-device copy bandwidth in GB/s (read + write counted)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=dev).uniform_()
    dst = torch.empty_like(src)
    return 2 * nbytes / median_seconds(lambda: dst.copy_(src), dev, reps=10, warmup=2) / 1e9


def time_fwd_bwd(fn, h1, h2, teacher, target, dev, reps):
    """(median seconds, peak bytes above the inputs or None) of loss + backward."""
    a = h1.detach().clone().requires_grad_()
    b = h2.detach().clone().requires_grad_()

    def step():
        a.grad = b.grad = None
        fn(a, b, teacher, target).backward()

    for _ in range(3):
        step()
    a.grad = b.grad = None
    peak = None
    if dev == "cuda":
        clock(dev)
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        clock(dev)
        peak = torch.cuda.max_memory_allocated() - base
    return median_seconds(step, dev, reps), peak


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", help="B,K,dtype[,teacher_dtype] with dtype in fp32/bf16/fp16")
    ap.add_argument("--kd-loss", default="binary_kl_norm", choices=["binary_kl", "binary_kl_norm"])
    ap.add_argument("--json", default="bench_dhkd_loss.json")
    ap.add_argument("--plot")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args(argv)
    run(args.sizes, args.kd_loss, args.json, args.reps, not args.no_compile, args.plot)


def run(
    sizes=None,
    kd_loss: str = "binary_kl_norm",
    json_path: str = "bench_dhkd_loss.json",
    reps: int | None = None,
    compile: bool = True,
    plot: str | None = None,
) -> dict:
    """The benchmark (``main``'s options as arguments); prints the table, writes ``json_path``,
    returns what it wrote."""
    gpu = torch.cuda.is_available()
    dev = "cuda" if gpu else "cpu"
    reps = reps or (50 if gpu else 10)
    sizes = sizes or (GPU_SIZES if gpu else CPU_SIZES)
    kd = kd_loss
    copy_gbps = copy_bandwidth(dev, 256 * 2**20 if gpu else 32 * 2**20)
    name = machine()["device"]
    print(f"# DHKD loss benchmark, kd_loss={kd}, forward+backward, median of {reps}, device: {name}")
    if not gpu:
        print("# NO GPU: the fused Triton kernel is not timed (interpreter only); PyTorch paths on CPU at")
        print("# small sizes; peak memory not measured on CPU.")
    print(f"# device-to-device copy bandwidth: {copy_gbps:.1f} GB/s")

    methods = {
        "eager published": lambda a, b, t, y: published_dhkd(a, b, t, y, kd_loss=kd),
        "torch reference": lambda a, b, t, y: reference_dhkd(a, b, t, y, kd_loss=kd),
    }
    if compile:
        compiled = torch.compile(lambda a, b, t, y: published_dhkd(a, b, t, y, kd_loss=kd))
        methods["compiled published"] = compiled
    if gpu:
        from dhkd_pipe.kernels import fused_dhkd_loss

        methods = {
            "fused": lambda a, b, t, y: fused_dhkd_loss(
                a, b, t, y, temperature=T, alpha=ALPHA, gamma=GAMMA, kd_loss=kd
            ),
            **methods,
        }

    rows = []
    for spec in sizes:
        parts = spec.split(",")
        B, K, dt = int(parts[0]), int(parts[1]), DTYPES[parts[2]]
        tdt = DTYPES[parts[3]] if len(parts) > 3 else dt
        g = torch.Generator(device=dev).manual_seed(0)
        h1 = torch.randn(B, K, device=dev, generator=g).to(dt)
        h2 = torch.randn(B, K, device=dev, generator=g).to(dt)
        teacher = (torch.randn(B, K, device=dev, generator=g) * 3).to(tdt)
        y = torch.randint(0, K, (B,), device=dev, generator=g)
        es, et = h1.element_size(), teacher.element_size()
        nbytes = B * K * (2 * es + et) + B * 8 + 2 * B * K * es
        for mname, fn in methods.items():
            # the eager paths want float teachers; int8 teachers only go to the fused kernel
            if tdt == torch.int8 and mname != "fused":
                continue
            try:
                sec, peak = time_fwd_bwd(fn, h1, h2, teacher, y, dev, reps)
            except Exception as e:  # e.g. torch.compile without a working toolchain
                print(f"# {B}x{K} {parts[2]} {mname} failed: {type(e).__name__}: {str(e)[:60]}")
                continue
            gbps = nbytes / sec / 1e9
            r = dict(
                B=B,
                K=K,
                dtype=parts[2],
                teacher_dtype=str(tdt).replace("torch.", ""),
                method=mname,
                median_ms=sec * 1e3,
                peak_mem_MB=None if peak is None else peak / 2**20,
                bytes=nbytes,
                GBps=gbps,
                frac_of_copy=gbps / copy_gbps,
                pct_of_copy=100 * gbps / copy_gbps,
            )
            rows.append(r)

    print_table(f"kd_loss={kd}, forward+backward, median of {reps}", rows, COLUMNS)
    out = dict(device=name, gpu=gpu, kd_loss=kd, reps=reps, copy_GBps=copy_gbps, machine=machine(), results=rows)
    write_results(json_path, out, log=lambda msg: print(f"# {msg}"))
    if plot:
        _plot(rows, plot, name)
    return out


def _plot(rows, path, device):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(f"{r['B']}x{r['K']} {r['dtype']}" for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, ax = plt.subplots(figsize=(1.8 * len(cases) + 2, 4))
    w = 0.8 / max(len(methods), 1)
    for i, m in enumerate(methods):
        xs, ys = [], []
        for j, c in enumerate(cases):
            for r in rows:
                if r["method"] == m and f"{r['B']}x{r['K']} {r['dtype']}" == c:
                    xs.append(j + i * w)
                    ys.append(r["median_ms"])
        ax.bar(xs, ys, w, label=m)
    ax.set_xticks([j + w * (len(methods) - 1) / 2 for j in range(len(cases))], cases)
    ax.set_ylabel("forward+backward, ms (median)")
    ax.set_yscale("log")
    ax.set_title(f"DHKD loss, {device}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"# wrote {path}")


if __name__ == "__main__":
    main()
