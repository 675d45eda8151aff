"""The multitask methods of torchjd 0.18 that ``--combiner NAME`` offers: one registry of lower-case names.

Two kinds (torchjd's own split):

- an *aggregator* (``torchjd.aggregation``) turns the per-task gradients of the shared encoder, stacked as a
  Jacobian matrix J (tasks x parameters), into one update vector; minbert builds J the way its ``pcgrad`` does (one
  backward per task, one task's graph alive at a time) and each head keeps its own task's gradient;
- a *scalarizer* (``torchjd.scalarization``) turns the vector of task losses into one loss; its gradient flows to
  every parameter, heads included. Some hold state or parameters (uncertainty weighting's log-variances, DWA's
  loss history, FAMO's task logits): they train, are saved in ``last/`` and resume bit-identically.

Each entry names its paper and what it does in one line (``--help`` and docs/multitask.md are built from this
table). Methods that need optimisation solvers (qpsolvers/quadprog for the dual-cone projection of UPGrad and
DualProj, cvxpy for CAGrad and Nash-MTL) name them in ``solvers``; without them ``--combiner`` fails in one line
naming ``pip install 'minbert[mtl-solvers]'`` before anything is written.

Left out on purpose: Krum and TrimmedMean (Byzantine-robust federated averaging, meaningless for 3 tasks), MoDo,
SDMGrad and CR-MOGM (weightings that need several independent Jacobians per step or wrap another weighting), and
torchjd's Sum/Mean/Constant/PCGrad aggregators (the same directions as minbert's ``sum``, the ``mean``/``constant``
scalarizers and minbert's ``pcgrad``; tests/test_mtl_crosscheck.py compares them).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

TORCHJD_VERSION = "0.18.0"  # the release these names, classes and constructor arguments were read from
EXTRA = "pip install 'minbert[mtl-solvers]'"

DUAL_CONE = ("qpsolvers", "quadprog")  # torchjd._linalg._dual_cone: solve_qp(..., solver="quadprog")


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # "aggregator" (torchjd.aggregation) or "scalarizer" (torchjd.scalarization)
    cls: str  # the torchjd class
    paper: str
    about: str
    solvers: tuple[str, ...] = ()  # importable modules it needs (the mtl-solvers extra)
    required: tuple[str, ...] = ()  # constructor arguments without a default: --combiner_args must give them
    # set by minbert, not by the user: "n_tasks" (Nash-MTL) or "shape" (per-task parameters), both = number of tasks
    auto: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict)  # minbert's own options of the combiner (not torchjd's)


_WEIGHTS_LR = {"weights_lr": 1e-3}  # Adam learning rate of the scalarizer's own parameters (UW, IMTL-L)

METHODS: dict[str, Method] = {m.name: m for m in [
    # --- aggregators: act on the shared encoder's per-task gradients ---
    Method("upgrad", "aggregator", "UPGrad", "Quinton & Rey 2024, Jacobian Descent for Multi-Objective Optimization",
           "projects each task gradient onto the dual cone of all of them and averages the projections",
           DUAL_CONE),
    Method("mgda", "aggregator", "MGDA", "Désidéri 2012, Multiple-gradient descent algorithm (MGDA); Sener & Koltun 2018",
           "the minimum-norm point of the convex hull of the task gradients"),
    Method("cagrad", "aggregator", "CAGrad", "Liu et al. 2021, Conflict-Averse Gradient Descent for Multi-task Learning",
           "the direction maximising the worst task's improvement within a ball of radius c around the mean gradient",
           ("cvxpy", "clarabel"), required=("c",)),
    Method("nash_mtl", "aggregator", "NashMTL", "Navon et al. 2022, Multi-Task Learning as a Bargaining Game",
           "the Nash bargaining solution: weights alpha with (G G^T) alpha = 1/alpha, by convex-concave iterations",
           ("cvxpy", "ecos"), auto=("n_tasks",)),
    Method("imtl_g", "aggregator", "IMTLG", "Liu et al. 2021, Towards Impartial Multi-task Learning",
           "weights whose combined gradient has equal projections onto every task's unit gradient"),
    Method("aligned_mtl", "aggregator", "AlignedMTL", "Senushkin et al. 2023, Independent Component Alignment for "
           "Multi-Task Learning", "aligns the principal components of the task gradients (condition number 1)"),
    Method("dualproj", "aggregator", "DualProj", "Quinton & Rey 2024, Jacobian Descent (Eq. 11, after Lopez-Paz & "
           "Ranzato 2017, GEM)", "projects the mean gradient onto the dual cone of the task gradients", DUAL_CONE),
    Method("graddrop", "aggregator", "GradDrop", "Chen et al. 2020, Just Pick a Sign: Optimizing Deep Multitask "
           "Models with Gradient Sign Dropout", "keeps, coordinate-wise, only the gradients of a randomly chosen sign"),
    Method("gradvac", "aggregator", "GradVac", "Wang et al. 2021, Gradient Vaccine: Investigating and Improving "
           "Multi-task Optimization", "moves task gradients toward an EMA target of their pairwise cosine similarity"),
    Method("config", "aggregator", "ConFIG", "Liu et al. 2024, ConFIG: Towards Conflict-free Training of Physics "
           "Informed Neural Networks", "the direction with equal positive cosine to every task gradient, scaled"),
    Method("fairgrad", "aggregator", "FairGrad", "Ban & Ji 2024, Fair Resource Allocation in Multi-Task Learning",
           "alpha-fair allocation of the update among tasks (alpha=1: proportional fairness)", required=("alpha",)),
    Method("excess_mtl", "aggregator", "ExcessMTL", "He et al. 2024, Robust Multi-Task Learning with Excess Risks",
           "weights tasks by their estimated excess risk (distance to their own optimum), updated each step"),
    Method("pcd", "aggregator", "PCD", "Not All Objectives Are Born Equal: Priority-Constrained Descent (TMLR 2026)",
           "follows the first task's (sst's) normalized gradient, each other task guaranteed a fraction tau of "
           "progress"),
    Method("rgw", "aggregator", "Random", "Lin et al. 2022, Reasonable Effectiveness of Random Weighting (RGW)",
           "random positive weights (softmax of a Gaussian) on the task gradients, redrawn each step"),
    # --- scalarizers: combine the losses, one ordinary backward ---
    Method("mean", "scalarizer", "Mean", "-", "the mean of the task losses (sum / number of tasks)"),
    Method("constant", "scalarizer", "Constant", "-", "fixed task weights (--combiner_args {\"weights\": [...]})",
           required=("weights",)),
    Method("uw", "scalarizer", "UW", "Kendall et al. 2018, Multi-Task Learning Using Uncertainty to Weigh Losses",
           "learned log-variances s_i: sum_i (exp(-s_i) L_i + s_i) / 2", auto=("shape",), extra=_WEIGHTS_LR),
    Method("dwa", "scalarizer", "DWA", "Liu et al. 2019, End-to-End Multi-Task Learning with Attention (Dynamic "
           "Weight Average)", "weights from the ratio of each task's mean loss over the last two epochs"),
    Method("famo", "scalarizer", "FAMO", "Liu et al. 2023, FAMO: Fast Adaptive Multitask Optimization",
           "softmax-weighted log-losses; the logits follow each task's loss decrease, updated after the step",
           auto=("shape",)),
    Method("imtl_l", "scalarizer", "IMTLL", "Liu et al. 2021, Towards Impartial Multi-task Learning (IMTL-L)",
           "learned log-scales s_i: sum_i (exp(s_i) L_i - s_i)", auto=("shape",), extra=_WEIGHTS_LR),
    Method("geometric_mean", "scalarizer", "GeometricMean", "Chennupati et al. 2019, MultiNet++ (geometric loss "
           "strategy)", "the geometric mean of the task losses"),
    Method("rlw", "scalarizer", "Random", "Lin et al. 2022, Reasonable Effectiveness of Random Weighting (RLW)",
           "random positive loss weights summing to 1, redrawn each step"),
    Method("stch", "scalarizer", "STCH", "Lin et al. 2024, Smooth Tchebycheff Scalarization for Multi-Objective "
           "Optimization", "a log-sum-exp smoothing (temperature mu) of the largest weighted loss",
           required=("mu",)),
    Method("pbi", "scalarizer", "PBI", "Zhang & Li 2007, MOEA/D (penalty-based boundary intersection)",
           "distance along a preference direction plus theta x the distance from it", required=("theta", "weights")),
    Method("cosmos", "scalarizer", "COSMOS", "Ruchte & Grabocka 2021, Scalable Pareto Front Approximation for Deep "
           "Multi-Objective Learning", "weighted sum minus lambda x cosine(losses, preference)",
           required=("lambda_", "weights")),
]}


def missing_solvers(method: Method) -> list[str]:
    """The solver modules ``method`` needs that are not installed (checked by import spec, nothing imported)."""
    return [name for name in method.solvers if importlib.util.find_spec(name) is None]


def help_text() -> str:
    """One line per method for ``--help``."""
    return "; ".join(f"{m.name} ({m.about})" for m in METHODS.values())


def markdown_table() -> str:
    """The table of docs/multitask.md (tests/test_mtl_methods.py checks the doc holds it)."""
    rows = ["| name | kind | torchjd class | paper | what it does | needs |", "|---|---|---|---|---|---|"]
    for m in METHODS.values():
        needs = ", ".join(m.solvers) + (" (mtl-solvers)" if m.solvers else "")
        args = ", ".join(m.required)
        about = m.about.replace("|", "/") + (f" — --combiner_args must give {args}" if args else "")
        rows.append(f"| `{m.name}` | {m.kind} | `{m.cls}` | {m.paper} | {about} | {needs or '-'} |")
    return "\n".join(rows)
