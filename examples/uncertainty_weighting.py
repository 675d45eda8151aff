"""Uncertainty weighting (Kendall, Gal & Cipolla 2018, "Multi-Task Learning Using Uncertainty to Weigh Losses for
Scene Geometry and Semantics", §3) as a minbert combiner, plugged in without editing the package:

    python train_multitask.py --combiner examples/uncertainty_weighting.py:UncertaintyWeighting --trust_combiner_code \
        --combiner_args '{"lr": 0.01}' --skip_bad_rows --output_dir runs/uncertainty

Each task t has a learned log-variance s_t = log sigma_t^2, and a step minimizes sum_t exp(-s_t) L_t + s_t (eq. 7
with its 1/2 factors folded into s_t): a task whose loss stays high gets a larger sigma_t, so a smaller weight
exp(-s_t); the + s_t term keeps sigma_t from growing without bound.
"""
import torch


class UncertaintyWeighting:
    def __init__(self, lr: float = 0.01, init_log_variance: float = 0.0):
        self.lr, self.init = lr, init_log_variance
        self.log_vars, self.optimizer, self.saved = None, None, None  # made at the first step (tasks, device)

    def step(self, ctx) -> dict[str, float]:
        if self.log_vars is None:
            device = ctx.shared_params[0].device
            self.log_vars = torch.full((len(ctx.tasks),), self.init, device=device, requires_grad=True)
            self.optimizer = torch.optim.Adam([self.log_vars], lr=self.lr)
            if self.saved is not None:  # --resume
                self.log_vars.data.copy_(self.saved["log_vars"])
                self.optimizer.load_state_dict(self.saved["optimizer"])
        losses = {}
        for i, task in enumerate(ctx.tasks):  # one task's graph in memory at a time
            loss = ctx.task_loss(task)
            (torch.exp(-self.log_vars[i]) * loss + self.log_vars[i]).backward()
            losses[task] = loss.item()
        ctx.sync_grads([self.log_vars])  # torchrun: the same weights on every rank (a no-op in one process)
        ctx.optimizer_step()  # the model's update: clip, skip if non-finite, step, zero its gradients
        self.optimizer.step()
        self.optimizer.zero_grad()
        return losses

    # Saved in OUTPUT_DIR/last, so that --resume continues with the learned weights.
    def state_dict(self) -> dict:
        if self.log_vars is None:
            return self.saved or {}
        return {"log_vars": self.log_vars.detach().cpu(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.saved = state or None
