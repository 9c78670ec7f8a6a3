"""Few-shot classification on scikit-learn's digits: iMAML vs MAML vs first-order MAML vs a JIIO context learner.

Run: `python examples/fewshot_digits.py [--steps 500] [--test-tasks 600] [--out outputs/] [--fast]`

Meta-training uses digits 0–4 and meta-testing the disjoint digits 5–9 (5-way 1-shot and 5-way
5-shot, 5 queries per class; pixels scaled to [0, 1]). Each (digit, quarter-turn) pair of 0–4 is a
meta-training class (20 classes; `--no-rotations` keeps the 5 plain digits). Three learners share
the MLP 64-64-64-5 (tanh: a smooth activation keeps the inner problem differentiable, see the tutorial):

- **iMAML** (`il.IMAML`): each task's `φ* = argmin L_train(φ) + λ/2‖φ − θ‖²` (λ = 1) by one batched
  Anderson solve over the meta-batch, run until every task meets its tolerance (the step size set per
  meta-step from the tasks' curvature); meta-gradient `(I + H/λ)⁻¹ ∇L_test` by conjugate gradient, also
  to tolerance. The progress bar shows, per meta-step, how many tasks met tol (`tol=16/16`), the most
  inner iterations (`it`) and how many CG solves met theirs (`cg`); the returned metrics keep these
  counts per meta-step, and the script fails at the end if any solve missed its tolerance.
- **MAML**: 16 inner SGD steps (lr 0.1), backpropagated through (second order).
- **FOMAML**: the same steps, first-order (the query gradient at `φ_K` is applied to `θ`).
- **JIIO context**: a DEQ `z = tanh(W z + (1 + G c) ⊙ U x + B c + b)` whose per-task context `c`
  is optimised jointly with the support states by `il.JIIO` (CE + β·mean(c²)); queries run the DEQ
  with `c*`.

It prints accuracy ± 95% interval over the meta-test tasks, the same learner's accuracy from its
untrained initialisation (same adaptation, no meta-training) and meta-training time per learner,
and saves `fewshot_digits.png` and `fewshot_digits.json` in `--out`. `--fast` is a tiny run for the
test suite.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap
from tqdm import tqdm

import implicitlayers as il

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the repository root makes `examples` importable
    sys.path.insert(0, str(ROOT))
from examples._common import digits_dataset, pinned_threads, pyplot, save_figure  # noqa: E402

Tasks = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


# ------------------------------------------------------------------------------ tasks
class TaskSampler:
    """N-way K-shot tasks from a pool of digit classes; labels are relabelled 0..N−1 per task.

    With `rotations=True` every (digit, quarter-turn) pair is a class of its own (the Omniglot
    augmentation of Finn et al.): 0–4 give 20 meta-training classes instead of 5, so tasks vary in
    which classes they contain and not only in how they are labelled.
    """

    def __init__(self, digits: list[int], n_way: int, k_shot: int, queries: int, seed: int, rotations: bool = False) -> None:
        x, target = digits_dataset()
        self.pools = []
        for d in digits:
            images = x[target == d]
            for k in range(4 if rotations else 1):
                self.pools.append(torch.rot90(images.view(-1, 8, 8), k, dims=(1, 2)).reshape(-1, 64))
        self.n_way, self.k_shot, self.queries = n_way, k_shot, queries
        self.rng = np.random.default_rng(seed)

    def sample(self, tasks: int) -> Tasks:
        """`support_x (T, N·K, 64)`, `support_y (T, N·K)`, `query_x (T, N·Q, 64)`, `query_y (T, N·Q)`."""
        k, q, n = self.k_shot, self.queries, self.n_way
        sx, sy, qx, qy = [], [], [], []
        for _ in range(tasks):
            chosen = self.rng.choice(len(self.pools), size=n, replace=False)
            s, qq = [], []
            for c in chosen:
                pool = self.pools[int(c)]
                idx = torch.from_numpy(self.rng.choice(len(pool), size=k + q, replace=False))
                s.append(pool[idx[:k]])
                qq.append(pool[idx[k:]])
            sx.append(torch.cat(s))
            qx.append(torch.cat(qq))
            sy.append(torch.arange(n).repeat_interleave(k))
            qy.append(torch.arange(n).repeat_interleave(q))
        return torch.stack(sx), torch.stack(sy), torch.stack(qx), torch.stack(qy)


def mlp(n_way: int, hidden: int = 64) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(64, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, n_way)
    )


# ------------------------------------------------------------------------------ learners
class IMAMLLearner(torch.nn.Module):
    """iMAML via `il.IMAML`: both of its solves run to tolerance, and `solve_counts` says whether they did.

    The inner problem is solved by Anderson (memory 10) on gradient steps whose size is set on every
    call from the tasks' curvature (`step_size="auto"`), until each task's gradient norm `‖∇L_train + λ(φ − θ)‖`
    is below `tol` (at most `max_iter` iterations); the meta-gradient's `(H + λI) x = g` by conjugate
    gradient until `cg_tol`. A failed solve is not hidden: the IFT gives that task a zero meta-gradient,
    and `solve_counts` reports it (the script counts it per meta-step and fails at the end).
    """

    def __init__(self, n_way: int, lam: float = 1.0, tol: float = 1e-4, max_iter: int = 500, cg_tol: float = 1e-5, cg_max_iter: int = 100) -> None:
        super().__init__()
        # "ignore": the script counts failures per meta-step (solve_counts) instead of warning each time.
        solver = il.Anderson(memory=10, tol=tol, max_iter=max_iter, on_failure="ignore")
        backward = il.IFT(solver=il.linear.CG(tol=cg_tol, max_iter=cg_max_iter, on_failure="ignore"))
        self.imaml = il.IMAML(mlp(n_way), F.cross_entropy, lam, solver=solver, backward=backward, step_size="auto")

    def forward(self, sx, sy, qx) -> torch.Tensor:
        return self.imaml.functional(self.imaml(sx, sy), qx)

    def solve_counts(self, backward: bool = True) -> dict[str, float]:
        """The last call's inner solve (and, after `.backward()`, its CG solve): tasks that met tol, iterations."""
        info = self.imaml.last_info
        counts = {"tasks": int(info.converged.numel()), "met_tol": int(info.converged.sum()), "iters": int(info.nstep.max()),
                  "step_size": self.imaml.last_step_size, "by_descent": self.imaml.last_finished_by_descent}
        if backward:
            cg = next(iter(self.imaml.layer.backward_info.values()))
            counts.update(cg_met_tol=int(cg.converged.sum()) if cg is not None else 0, cg_iters=int(cg.nstep.max()) if cg is not None else 0)
        return counts


class MAMLLearner(torch.nn.Module):
    """MAML (`first_order=False`) or FOMAML: `steps` SGD steps on the support loss, batched over tasks."""

    def __init__(self, n_way: int, steps: int = 16, lr: float = 0.1, first_order: bool = False) -> None:
        super().__init__()
        self.model, self.steps, self.lr, self.first_order = mlp(n_way), steps, lr, first_order
        self.names = [n for n, _ in self.model.named_parameters()]
        self.shapes = [p.shape for p in self.model.parameters()]

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = torch.split(flat, [math.prod(s) for s in self.shapes], dim=-1)
        return {n: p.reshape(*flat.shape[:-1], *s) for n, s, p in zip(self.names, self.shapes, parts)}

    def support_loss(self, phi: torch.Tensor, sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
        """Summed over tasks, so its gradient is each task's own gradient (tasks do not interact)."""
        task = lambda p, x, y: F.cross_entropy(functional_call(self.model, self.unflatten(p), (x,)), y)  # noqa: E731
        return vmap(task)(phi, sx, sy).sum()

    def adapt(self, sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
        theta = torch.cat([p.reshape(-1) for p in self.model.parameters()])
        second_order = torch.is_grad_enabled() and not self.first_order
        phi = theta.expand(sx.shape[0], -1)
        if not second_order:
            phi = phi.detach()
        for _ in range(self.steps):
            with torch.enable_grad():
                if not phi.requires_grad:
                    phi = phi.requires_grad_()
                (g,) = torch.autograd.grad(self.support_loss(phi, sx, sy), phi, create_graph=second_order)
            phi = phi - self.lr * g
            if not second_order:
                phi = phi.detach()
        if self.first_order and torch.is_grad_enabled():
            phi = theta + (phi - theta).detach()  # FOMAML: dφ/dθ ≈ I
        return phi

    def forward(self, sx, sy, qx) -> torch.Tensor:
        phi = self.adapt(sx, sy)
        return vmap(lambda p, x: functional_call(self.model, self.unflatten(p), (x,)))(phi, qx)


class ContextCell(torch.nn.Module):
    """`z' = tanh(W z + (1 + G c) ⊙ U x + B c + b)` per example: FiLM conditioning on the task context `c`.

    The multiplicative term lets a context re-weight input features per task (an additive context
    alone shifts every example alike). `W` is rescaled to spectral norm ≤ 0.9 once per call, so the
    map is a contraction in `z` (tanh is 1-Lipschitz).
    """

    def __init__(self, hidden: int, context: int) -> None:
        super().__init__()
        self.W = torch.nn.Parameter(torch.randn(hidden, hidden) * 0.3 / hidden**0.5)
        self.U = torch.nn.Linear(64, hidden)
        self.G = torch.nn.Linear(context, hidden, bias=False)
        self.B = torch.nn.Linear(context, hidden, bias=False)
        self.w_eff: torch.Tensor | None = None

    def contract(self) -> None:
        """Compute the contractive `W` once (its graph is reused by every solver step and the IFT)."""
        sigma = torch.linalg.matrix_norm(self.W, ord=2)
        self.w_eff = self.W * torch.clamp(0.9 / sigma, max=1.0)

    def forward(self, z: torch.Tensor, c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`z (T, N, H)`, `c (T, C)`, `x (T, N, 64)`."""
        film = (1 + self.G(c)).unsqueeze(1)
        return torch.tanh(z @ self.w_eff.T + film * self.U(x) + self.B(c).unsqueeze(1))


class JIIOContextLearner(torch.nn.Module):
    """A per-task context `c` found jointly with the support equilibria by `il.JIIO`; queries reuse `c*`."""

    def __init__(self, n_way: int, hidden: int = 64, context: int = 32, beta: float = 0.01, steps: int = 100, step_size: float = 5.0) -> None:
        super().__init__()
        self.cell = ContextCell(hidden, context)
        self.head = torch.nn.Linear(hidden, n_way)
        self.hidden, self.beta = hidden, beta

        def objective(logits: torch.Tensor, y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape).mean(1)
            return ce + self.beta * c.pow(2).mean(1)

        self.jiio = il.JIIO(
            self.cell, lambda z, x: self.head(z), objective, input_shape=context,
            solver=il.Anderson(memory=5, tol=1e-4, max_iter=steps, on_failure="ignore"),
            backward=il.IFT(solver=il.Anderson(tol=1e-4, max_iter=30, on_failure="ignore")),
            z_init=lambda y, x: x.new_zeros(*y.shape, self.hidden), step_size=step_size,
        )
        # Queries: a DEQ on (x, c*) packed into one input, since il.DEQ takes one tensor.
        self.query_deq = il.DEQ(
            lambda z, xc: self.cell(z, xc[:, 0, 64:], xc[..., :64]),
            solver=il.Anderson(memory=5, tol=1e-4, max_iter=30, on_failure="ignore"),
            backward=il.IFT(solver=il.Anderson(tol=1e-4, max_iter=30, on_failure="ignore")),
            z_init=lambda xc: xc.new_zeros(*xc.shape[:2], self.hidden),
        )

    def adapt(self, sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
        self.cell.contract()
        c_star, _ = self.jiio(sy, sx)
        return c_star

    def forward(self, sx, sy, qx) -> torch.Tensor:
        c = self.adapt(sx, sy)
        xc = torch.cat([qx, c.unsqueeze(1).expand(-1, qx.shape[1], -1)], -1)
        return self.head(self.query_deq(xc))


# ------------------------------------------------------------------------------ training and evaluation
class SolveLog:
    """Per meta-step counts of an `IMAMLLearner`'s solves: how many tasks met tol (inner and CG), iterations."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def add(self, counts: dict[str, float]) -> None:
        self.rows.append(counts)

    def failed(self, key: str = "met_tol") -> int:
        return int(sum(r["tasks"] - r[key] for r in self.rows))

    def summary(self, prefix: str) -> dict:
        if not self.rows:
            return {}
        out = {
            f"{prefix}met_tol_per_step": [r["met_tol"] for r in self.rows],
            f"{prefix}solves": int(sum(r["tasks"] for r in self.rows)),
            f"{prefix}failed": self.failed(),
            f"{prefix}iters_mean": float(np.mean([r["iters"] for r in self.rows])),
            f"{prefix}iters_max": int(max(r["iters"] for r in self.rows)),
            f"{prefix}finished_by_descent": int(sum(r["by_descent"] for r in self.rows)),
            f"{prefix}step_size_first_last": [self.rows[0]["step_size"], self.rows[-1]["step_size"]],
        }
        if "cg_met_tol" in self.rows[0]:
            out[f"{prefix}cg_failed"] = self.failed("cg_met_tol")
            out[f"{prefix}cg_iters_max"] = int(max(r["cg_iters"] for r in self.rows))
        return out


def meta_train(learner: torch.nn.Module, sampler: TaskSampler, steps: int, meta_batch: int, lr: float, desc: str) -> tuple[float, SolveLog]:
    opt = torch.optim.Adam(learner.parameters(), lr=lr)
    log = SolveLog()
    start = time.perf_counter()
    bar = tqdm(range(steps), desc=desc, leave=False)
    for _ in bar:
        sx, sy, qx, qy = sampler.sample(meta_batch)
        loss = F.cross_entropy(learner(sx, sy, qx).flatten(0, 1), qy.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if isinstance(learner, IMAMLLearner):
            counts = learner.solve_counts()
            log.add(counts)
            bar.set_postfix(loss=f"{loss.item():.3f}", tol=f"{counts['met_tol']}/{counts['tasks']}", it=counts["iters"],
                            cg=f"{counts['cg_met_tol']}/{counts['tasks']}")
        else:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return time.perf_counter() - start, log


def evaluate(learner: torch.nn.Module, sampler: TaskSampler, tasks: int, chunk: int = 50) -> tuple[float, float, SolveLog]:
    """Mean query accuracy over `tasks` meta-test tasks, its 95% interval half-width (1.96·sd/√n), and the solves' log."""
    accs = []
    log = SolveLog()
    with torch.no_grad():
        for done in range(0, tasks, chunk):
            sx, sy, qx, qy = sampler.sample(min(chunk, tasks - done))
            accs.append((learner(sx, sy, qx).argmax(-1) == qy).float().mean(1))
            if isinstance(learner, IMAMLLearner):
                log.add(learner.solve_counts(backward=False))
    acc = torch.cat(accs)
    return float(acc.mean()), float(1.96 * acc.std() / math.sqrt(len(acc))), log


LEARNERS: dict[str, Callable[..., torch.nn.Module]] = {
    "iMAML": lambda n, a: IMAMLLearner(n, tol=a.inner_tol, max_iter=a.inner_max_iter, cg_tol=a.cg_tol, cg_max_iter=a.cg_max_iter),
    "MAML": lambda n, a: MAMLLearner(n, steps=a.inner_steps),
    "FOMAML": lambda n, a: MAMLLearner(n, steps=a.inner_steps, first_order=True),
    "JIIO context": lambda n, a: JIIOContextLearner(n),
}


def main(argv: list[str] | None = None) -> dict:
    """Meta-train and meta-test every learner in every setting; returns `{setting: {learner: metrics}}`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500, help="meta-training steps")
    parser.add_argument("--meta-batch", type=int, default=16)
    parser.add_argument("--inner-steps", type=int, default=16, help="MAML/FOMAML: inner SGD steps")
    parser.add_argument("--inner-tol", type=float, default=1e-4, help="iMAML: tolerance of the inner solve (each task's gradient norm)")
    parser.add_argument("--inner-max-iter", type=int, default=500, help="iMAML: iteration cap of the inner solve")
    parser.add_argument("--cg-tol", type=float, default=1e-5, help="iMAML: tolerance of the meta-gradient's CG solve")
    parser.add_argument("--cg-max-iter", type=int, default=100, help="iMAML: iteration cap of the CG solve")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--test-tasks", type=int, default=600)
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--learners", nargs="+", default=list(LEARNERS), choices=list(LEARNERS))
    parser.add_argument("--no-rotations", action="store_true", help="meta-train on the 5 plain digits only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (small models: 1 avoids threading overhead)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("outputs"))
    parser.add_argument("--fast", action="store_true", help="tiny run (a few steps, 50 test tasks) for the test suite")
    parser.add_argument("--allow-unconverged", action="store_true", help="report, but do not fail on, iMAML solves that missed tol")
    args = parser.parse_args(argv)
    if args.fast:
        args.steps, args.test_tasks, args.meta_batch, args.shots = 3, 50, 4, [1]
    args.out.mkdir(parents=True, exist_ok=True)
    with pinned_threads(args.threads):
        return run(args)


def run(args: argparse.Namespace) -> dict:
    n_way, queries = 5, 5
    metrics: dict[str, dict[str, dict]] = {}
    unconverged = []
    for shots in args.shots:
        setting = f"{n_way}-way {shots}-shot"
        metrics[setting] = {}
        for name in args.learners:
            torch.manual_seed(args.seed)
            train = TaskSampler([0, 1, 2, 3, 4], n_way, shots, queries, seed=args.seed, rotations=not args.no_rotations)
            test = TaskSampler([5, 6, 7, 8, 9], n_way, shots, queries, seed=args.seed + 1)
            learner = LEARNERS[name](n_way, args)
            init_acc, _, _ = evaluate(learner, test, args.test_tasks)  # the same adaptation from the untrained init
            test = TaskSampler([5, 6, 7, 8, 9], n_way, shots, queries, seed=args.seed + 1)
            seconds, train_log = meta_train(learner, train, args.steps, args.meta_batch, args.lr, f"{setting} {name}")
            acc, ci, test_log = evaluate(learner, test, args.test_tasks)
            metrics[setting][name] = {"accuracy": acc, "ci95": ci, "train_time_s": seconds, "init_accuracy": init_acc,
                                      **train_log.summary("train_inner_"), **test_log.summary("test_inner_")}
            print(
                f"{setting:>12} {name:>13}: accuracy {100 * acc:5.1f} ± {100 * ci:4.1f} % (untrained init {100 * init_acc:5.1f} %)"
                f"  meta-train {seconds:6.1f} s"
            )
            if train_log.rows:
                m = metrics[setting][name]
                print(
                    f"{'':>27}inner solves that met tol: meta-training {m['train_inner_solves'] - m['train_inner_failed']}/"
                    f"{m['train_inner_solves']} (all tasks in {sum(r['met_tol'] == r['tasks'] for r in train_log.rows)}/{len(train_log.rows)} "
                    f"meta-steps; iterations mean of max {m['train_inner_iters_mean']:.0f}, max {m['train_inner_iters_max']}), "
                    f"meta-test {m['test_inner_solves'] - m['test_inner_failed']}/{m['test_inner_solves']}; finished by descent steps "
                    f"after Anderson stalled: {m['train_inner_finished_by_descent']} + {m['test_inner_finished_by_descent']}; "
                    f"CG met tol {m['train_inner_solves'] - m['train_inner_cg_failed']}/{m['train_inner_solves']}"
                )
                if m["train_inner_failed"] or m["test_inner_failed"] or m["train_inner_cg_failed"]:
                    unconverged.append(f"{setting} {name}")
    (args.out / "fewshot_digits.json").write_text(json.dumps(metrics, indent=2))
    plot(metrics, args.out / "fewshot_digits.png")
    if unconverged and not args.allow_unconverged:
        raise RuntimeError(
            f"iMAML solves missed their tolerance in {unconverged} (counts above and in fewshot_digits.json): their "
            "meta-gradients were taken at an inexact φ* (or zeroed, for CG). Raise --inner-max-iter / --cg-max-iter, "
            "or pass --allow-unconverged to keep the run's results anyway."
        )
    return metrics


def plot(metrics: dict, path: pathlib.Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    settings = list(metrics)
    learners = list(next(iter(metrics.values())))
    width = 0.8 / len(learners)
    for i, name in enumerate(learners):
        xs = np.arange(len(settings)) + i * width
        accs = [100 * metrics[s][name]["accuracy"] for s in settings]
        cis = [100 * metrics[s][name]["ci95"] for s in settings]
        axes[0].bar(xs, accs, width, yerr=cis, capsize=3, label=name)
        inits = [100 * metrics[s][name].get("init_accuracy", float("nan")) for s in settings]
        axes[0].scatter(xs, inits, marker="_", s=200, color="black", label="untrained init" if i == 0 else None, zorder=3)
        axes[1].bar(xs, [metrics[s][name]["train_time_s"] for s in settings], width, label=name)
    for ax, title in zip(axes, ["meta-test accuracy (%) ± 95% CI", "meta-training time (s)"]):
        ax.set_xticks(np.arange(len(settings)) + 0.4 - width / 2, settings)
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
