"""check-reference's training trajectories: several steps of each stage, run by the stages' own
step functions with the paper preset's settings, against the reference code's (the *_train_*.npz
fixtures, tools/reference_fixtures/make_fixtures.py). What makes each term of the maths observable:

- every loss term, every step's gradients (before the clip, and after it: the clip is compared,
  and the fixtures' starting weights make stage 1's fire), the lr schedule at many steps;
- Adam's state at the end (exp_avg, exp_avg_sq: the betas), compared per tensor as gradients are;
- a replay: our optimiser, schedule and clip (built from the preset) fed the reference's own
  gradients, step by step; the parameters it ends at match the reference's to float round-off,
  so no optimiser setting (lr, betas, eps, weight decay, clip, schedule) hides in Adam's +-lr;
- our own steps forced onto the replayed trajectory (each starts where the reference's did), and
  the round-off of each of stage 1's tensors measured by running the same step in the reference's
  memory layout: 3x that difference (at most 2% of the tensor) is added to its bound;
- the parameters our own trajectory ends at, within a bound derived from the gradients: Adam's
  step lr m/(sqrt(v)+eps) moves by at most 2.2 x max|delta g| / (sqrt(v)+eps) (capped at 2.2:
  |m|/sqrt(v) <= 1.1 over these few steps) when the gradients differ by delta g; summed over the
  steps. An element with a real gradient gets a tight bound; one whose gradient is round-off (a
  conv bias before a BatchNorm) gets 2.2 x sum(lr) -- and is checked as a zero gradient instead.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np
import torch

from lapo_fast.config import BCConfig, FinetuneConfig, LAMConfig, resolve
from lapo_fast.layout import memory_format
from lapo_fast.models import DecodedPolicy, LatentIDM, LatentPolicy, build_lam

from .reference import _IDM_MAP, _POLICY_MAP, ATOL, GRAD_FLOOR, GRAD_RTOL, Report, _load, _mapped, _scale

# Adam's step per unit of lr, |m_hat| / sqrt(v_hat), stays below 1.1 over 5 steps (Cauchy-Schwarz
# with beta1 0.9, beta2 0.999); a gradient difference moves it by at most 2.2 x |delta g| / sqrt(v).
ADAM_UNIT = 2.2
# The replay (the reference's gradients through our optimiser): parameters' change within this
# fraction of the reference's change, per tensor (float32 round-off of two optimiser codes).
REPLAY_RTOL = 1e-5
# PPO's trained layers (linear heads on the trunk's features) carry the trunk's round-off only:
# their gradients match to ~5e-7 relative; 1e-4 still sees the entropy bonus's share (~0.3%).
PPO_GRAD_RTOL = 1e-4


def _prefixed(d, prefix: str, mapping=()) -> dict[str, torch.Tensor]:
    """The fixture's initial state under `prefix` (param/<prefix>.<name>, buffer/...), names mapped to ours."""
    out = {}
    for key in d.files:
        kind, _, name = key.partition("/")
        if kind in ("param", "buffer") and name.startswith(prefix + "."):
            out[_mapped(name[len(prefix) + 1:], mapping)] = torch.from_numpy(np.array(d[key]))
    return out


def _hwc(windows_u8: np.ndarray) -> torch.Tensor:
    """The reference's (B, T, C, H, W) uint8 windows in our frames' layout (B, T, H, W, C)."""
    return torch.from_numpy(windows_u8).permute(0, 1, 3, 4, 2).contiguous()


class _Grads:
    """Each parameter's gradient as backward leaves it (before any clip), recorded by hooks."""

    def __init__(self, named: dict[str, torch.nn.Parameter]):
        self.last: dict[str, torch.Tensor] = {}
        self.handles = [p.register_post_accumulate_grad_hook(
            lambda p, k=k: self.last.__setitem__(k, p.grad.detach().clone())) for k, p in named.items()]

    def take(self) -> dict[str, torch.Tensor]:
        out, self.last = self.last, {}
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _adam_v(grads: list[np.ndarray], beta2: float) -> list[np.ndarray]:
    """Adam's bias-corrected second moment after each step of `grads`."""
    v, out = np.zeros_like(grads[0], np.float64), []
    for t, g in enumerate(grads, 1):
        v = beta2 * v + (1 - beta2) * np.square(g, dtype=np.float64)
        out.append(v / (1 - beta2 ** t))
    return out


def adam_bound(lrs, ours: list[np.ndarray], theirs: list[np.ndarray], *, beta2: float, eps: float,
               param: np.ndarray) -> np.ndarray:
    """Per element, how far two Adam trajectories fed these gradient sequences can end apart (see
    the module's docstring), plus float32 round-off of the parameter itself."""
    v_ours, v_theirs = _adam_v(ours, beta2), _adam_v(theirs, beta2)
    bound, delta = np.zeros_like(param, np.float64), np.zeros_like(param, np.float64)
    for lr, go, gt, vo, vt in zip(lrs, ours, theirs, v_ours, v_theirs):
        delta = np.maximum(delta, np.abs(go.astype(np.float64) - gt))
        denom = np.sqrt(np.minimum(vo, vt)) + eps
        bound += lr * np.minimum(ADAM_UNIT, ADAM_UNIT * delta / denom)
    return bound + 4 * len(lrs) * np.finfo(np.float32).eps * np.abs(param) + 1e-9


def _check_adam(report: Report, fixture: str, prefix: str, optimizer, named: dict, d, to_ref, scale: float,
                rtol: float = GRAD_RTOL, roundoff: dict | None = None) -> None:
    """Adam's exp_avg and exp_avg_sq per tensor (relative, as gradients; `roundoff`: name -> the
    allowance of each, from the round-off measured in the gradients) and its step count (exact)."""
    for ours_name, p in named.items():
        ref = to_ref(ours_name)
        state = optimizer.state.get(p, {})
        for i, (field, power) in enumerate((("exp_avg", 1), ("exp_avg_sq", 2))):
            key = f"{prefix}{field}/{ref}"
            if key in d.files:
                mine = state.get(field)
                extra = roundoff[ours_name][i] if roundoff and ours_name in roundoff else 0.0
                extra = min(extra, power * ROUNDOFF_CAP * float(np.linalg.norm(d[key])))
                report.relative(fixture, f"adam/{field}/{ref}", mine, d[key], rtol=power * rtol,
                                floor=GRAD_FLOOR ** power, scale=scale ** power, roundoff=extra)
        key = f"{prefix}step/{ref}"
        if key in d.files:
            report.exact(fixture, f"adam/step/{ref}", float(state.get("step", 0)), d[key])


def _check_schedule(report: Report, fixture: str, d, lr_at) -> None:
    """The lr of each group at each step the fixture tabulates (lr_at(step) -> one lr per group)."""
    if "output/schedule/at" not in d.files:  # the older one- and two-step files: their lr rows say it
        return
    at, table = d["output/schedule/at"], d["output/schedule/lr"]
    ours = np.array([lr_at(int(s)) for s in at], np.float64).reshape(table.shape)
    report.close(fixture, "schedule/lr at " + ",".join(str(int(s)) for s in at), ours, table, rtol=1e-6, atol=1e-12)


def _start(optimizer, schedule, d) -> list[float]:
    """Steps `schedule` to the fixture's first step (as a resumed run's would be); the first-group
    lr it then gives each of the fixture's steps."""
    with warnings.catch_warnings():  # stepped before any optimiser step, on purpose
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(int(d["input/start_step"])):
            schedule.step()
    first = int(d["input/start_step"])
    return [schedule.base_lrs[0] * schedule.lr_lambdas[0](first + i) for i in range(_steps(d))]


class _Replay:
    """Our optimiser, schedule and clip (optimizer_step, as the stages call it; built by `make_opt`
    from the preset) fed the reference's own gradients, step by step. Its parameters follow the
    reference's trajectory to float round-off (`check`: at the end), so our model's own steps are
    forced onto it (`force`): each of our steps starts where the reference's did, and what it
    computes is compared tightly at every step instead of drifting apart (Adam moves elements
    whose gradient is round-off by +-lr, which later steps' gradients feel at the 1-10% level)."""

    def __init__(self, start: dict[str, torch.Tensor], make_opt, clip: float, d):
        self.start, self.clip = start, clip
        self.params = {k: v.detach().clone().requires_grad_(True) for k, v in start.items()}
        self.optimizer, self.schedule = make_opt(list(self.params.values()))
        _start(self.optimizer, self.schedule, d)

    def step(self, grads: dict[str, torch.Tensor]) -> None:
        from lapo_fast.runtime.optim import optimizer_step

        params = list(self.params.values())
        # backward of sum(p * g) leaves exactly g in p.grad
        loss = sum((p * grads[k]).sum() for k, p in self.params.items())
        optimizer_step(loss, params, self.optimizer, self.schedule, self.clip)

    def force(self, named: dict[str, torch.nn.Parameter]) -> None:
        with torch.no_grad():
            for k, p in self.params.items():
                named[k].copy_(p)

    def check(self, report: Report, fixture: str, d, ref_name, after_prefix: str) -> None:
        """Every parameter's end against the reference's: the difference within REPLAY_RTOL of how
        far it moved, plus two float32 ulps of it (far below weight decay's lr x 1e-2 x p per step)."""
        for k, p in self.params.items():
            key = f"{after_prefix}{ref_name(k)}"
            if key in d.files:
                theirs = d[key].astype(np.float64)
                moved = theirs - self.start[k].numpy()
                diff = float(np.linalg.norm(p.detach().numpy() - theirs))
                bound = (REPLAY_RTOL * float(np.linalg.norm(moved))
                         + 2 * float(np.finfo(np.float32).eps) * float(np.linalg.norm(theirs)))
                report.rows.append((fixture, f"replay/param_after/{ref_name(k)}", diff, bound, diff <= bound))


# -- stage 1 ---------------------------------------------------------------------------------------------

def check_stage1_train(d, name: str, report: Report) -> None:
    """Stage 1 as stages/lam.py runs it (make_step: the LAM's loss, AdamW, the schedule, the clip)."""
    from lapo_fast.stages import lam as stage

    idm_state, fdm_state = _prefixed(d, "idm", _IDM_MAP), _prefixed(d, "wm")
    cfg = replace(resolve(LAMConfig, "paper"), impala_scale=idm_state["encoder.stages.0.conv.weight"].shape[0] // 16,
                  fdm_width=fdm_state["down.0.conv.weight"].shape[0])
    model = build_lam(cfg)
    _load(model.idm, idm_state, ("vq.initialized", "vq.refills"))
    _load(model.fdm, fdm_state)
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    named = dict(model.named_parameters())
    to_ref = _ref_stage1
    stored = {k for k in named if f"output/param_after/{to_ref(k)}" in d.files}
    optimizer, schedule = cfg.optimizer(model.parameters())
    step = stage.make_step(model, model, optimizer, schedule, cfg, "cpu")
    lrs = _start(optimizer, schedule, d)
    steps = _steps(d)
    ref_pre = _stored_grads(d, "grad_pre_clip", named, to_ref, steps)
    # every gradient stored (the small size): the replay, and our steps forced onto it
    replay = _Replay(start, cfg.optimizer, cfg.grad_clip, d) if all(len(g) == len(named) for g in ref_pre) else None
    zero = _zero_gradient(model.fdm, "fdm.")
    probe = _RoundOff(model, cfg)
    grads = _Grads(named)
    ours_post, theirs_post, twin_post = [], [], []
    buffers = _stage1_buffers(model)
    allowance = {k: np.zeros(v.shape) for k, v in buffers.items()}
    model.train()
    for i in range(steps):
        o = f"output/step{i}/"
        if replay is not None and i > 0:
            replay.force(named)
        obs = _hwc(d[f"input/step{i}/obs_uint8"])
        twin_pre, twin_buffers = probe(obs, named)
        out = step({"obs": obs})
        pre = grads.take()
        for k, v in buffers.items():  # each step's round-off in the buffers, summed
            allowance[k] += np.abs(v.detach().numpy().astype(np.float64) - twin_buffers[k])
        scale = float(d[o + "grad_norm"])
        ref_coef = min(1.0, 2.0 / (scale + 1e-6))  # the reference's clip_grad_norm_(..., 2)
        twin_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g)
                                                                for g in twin_pre.values()])))
        twin_coef = min(1.0, cfg.grad_clip / (twin_norm + 1e-6)) if cfg.grad_clip > 0 else 1.0
        for key, ours in (("wm_loss", out["fdm_loss"]), ("vq_loss", out["vq_loss"]), ("vq_perp", out["perplexity"]),
                          ("lr", lrs[i])):
            report.close(name, f"step{i}/{key}", ours, d[o + key])
        norm = out.get("grad_norm", torch.tensor(float("nan")))
        report.close(name, f"step{i}/grad_norm", norm, d[o + "grad_norm"],
                     atol=ATOL + ROUNDOFF_K * abs(float(norm) - twin_norm))
        report.exact(name, f"step{i}/la_qinds", out["indices"], d[o + "la_qinds"][..., 0])
        if replay is None and i > 0:  # free trajectories drift apart (see _Replay): the parameters say the rest
            continue
        step_ours, step_theirs, step_twin = {}, {}, {}
        for k, theirs in ref_pre[i].items():
            theirs = theirs.numpy()
            step_ours[k], step_theirs[k] = named[k].grad.detach().numpy().copy(), theirs * ref_coef
            step_twin[k] = twin_pre[k].numpy() * twin_coef
            roundoff = _allowance(pre[k], twin_pre[k], theirs)
            if k in zero:
                _zero_row(report, name, f"step{i}/zero-gradient (bias before BatchNorm)/{to_ref(k)}", pre.get(k),
                          theirs, scale, ROUNDOFF_K * float(torch.linalg.vector_norm(pre[k] - twin_pre[k])))
                continue
            report.relative(name, f"step{i}/grad_pre_clip/{to_ref(k)}", pre.get(k), theirs, scale=scale,
                            roundoff=roundoff)
            report.relative(name, f"step{i}/grad_post_clip/{to_ref(k)}", named[k].grad, theirs * ref_coef,
                            scale=scale * ref_coef, roundoff=_allowance(step_ours[k], step_twin[k], theirs * ref_coef))
        ours_post.append(step_ours)
        theirs_post.append(step_theirs)
        twin_post.append(step_twin)
        if replay is not None:
            replay.step(ref_pre[i])
    grads.remove()
    total = float(sum(d[f"output/step{i}/grad_norm"] for i in range(steps)))
    betas = optimizer.defaults["betas"]
    _check_adam(report, name, "output/adam/", optimizer, named, d, to_ref, total,
                roundoff=_adam_roundoff(ours_post, twin_post, betas) if len(twin_post) == steps else None)
    bounds = {}
    for k in stored:
        theirs = d[f"output/param_after/{to_ref(k)}"]
        bound = bounds[k] = _param_bound(k, lrs, ours_post, theirs_post, optimizer, theirs)
        _close_bound(report, name, f"param_after/{to_ref(k)}", named[k], theirs, bound)
    _check_stage1_buffers(report, name, buffers, d, bounds, {k: ROUNDOFF_K * v for k, v in allowance.items()})
    _check_schedule(report, name, d, lambda s: [cfg.lr * schedule.lr_lambdas[0](s)])
    if replay is not None:
        replay.check(report, name, d, to_ref, "output/param_after/")


# The round-off allowance: this many times the difference between our step in our layout and the
# same step in the reference's (contiguous) layout, measured per tensor and step (_RoundOff). The
# FDM's BatchNorms on 8 windows amplify round-off: up to ~2% of a gradient at the paper size.
ROUNDOFF_K = 3.0
# ... and never more than this fraction of the reference's tensor: with GRAD_RTOL, a 5% error in one
# tensor always fails. A larger layout difference (a ReLU or VQ choice flipped: a near-tie) is left to
# check_reference's second pass in the reference's layout.
ROUNDOFF_CAP = 0.02


def _allowance(ours, twin, theirs) -> float:
    """The round-off allowance of one tensor: ROUNDOFF_K x |ours - twin|, capped (ROUNDOFF_CAP)."""
    diff = float(np.linalg.norm(np.asarray(ours, np.float64) - np.asarray(twin, np.float64)))
    return min(ROUNDOFF_K * diff, ROUNDOFF_CAP * float(np.linalg.norm(theirs)))


class _RoundOff:
    """Our model's twin in the reference's memory layout: the same step's gradients and buffers
    computed with other round-off, whose difference from ours measures the round-off of each
    tensor (it is not an error: a wrong line of maths moves both alike)."""

    def __init__(self, model, cfg):
        from lapo_fast.layout import reference_layout

        self.layout = reference_layout
        with reference_layout():
            self.twin = build_lam(cfg)
        self.twin.train()
        self.model = model

    def __call__(self, obs_u8: torch.Tensor, named: dict) -> tuple[dict, dict]:
        """(gradients before any clip, buffers after) of the twin at `model`'s current state."""
        from lapo_fast.data.loader import normalize

        self.twin.load_state_dict(self.model.state_dict())
        self.twin.zero_grad(set_to_none=True)
        with self.layout():
            loss, *_ = self.twin(normalize(obs_u8))
        loss.backward()
        grads = {k: p.grad.detach().clone() for k, p in self.twin.named_parameters()}
        return grads, {k: v.detach().numpy().astype(np.float64) for k, v in _stage1_buffers(self.twin).items()}


def _adam_roundoff(ours: list[dict], twin: list[dict], betas) -> dict[str, tuple[float, float]]:
    """Per tensor, ROUNDOFF_K x how far Adam's exp_avg and exp_avg_sq built from our gradients
    and from the twin's end apart (both are weighted sums of the steps' gradients and squares)."""
    b1, b2 = betas
    T, out = len(ours), {}
    for k in ours[0]:
        m = sum((1 - b1) * b1 ** (T - 1 - t) * (ours[t][k].astype(np.float64) - twin[t][k]) for t in range(T))
        v = sum((1 - b2) * b2 ** (T - 1 - t)
                * (np.square(ours[t][k], dtype=np.float64) - np.square(twin[t][k], dtype=np.float64)) for t in range(T))
        out[k] = (ROUNDOFF_K * float(np.linalg.norm(m)), ROUNDOFF_K * float(np.linalg.norm(v)))
    return out  # capped where compared (_check_adam)


def _stage1_buffers(model) -> dict[str, torch.Tensor]:
    """The reference's name of each of stage 1's buffers: the VQ's EMA state and the FDM's BatchNorm statistics."""
    out = {"idm.vq.embedding": model.idm.vq.codebook, "idm.vq.ema_count": model.idm.vq.ema_count,
           "idm.vq.ema_weight": model.idm.vq.ema_weight}
    out.update({f"wm.{k}": v for k, v in model.fdm.state_dict().items() if "running" in k})
    return out


def _stored_grads(d, kind: str, named: dict, to_ref, steps: int) -> list[dict[str, torch.Tensor]]:
    """Each step's gradients the fixture stores (output/step<i>/<kind>/<reference name>), by our name."""
    return [{k: torch.from_numpy(d[f"output/step{i}/{kind}/{to_ref(k)}"]) for k in named
             if f"output/step{i}/{kind}/{to_ref(k)}" in d.files} for i in range(steps)]


def _param_bound(k: str, lrs, ours: list[dict], theirs: list[dict], optimizer, param: np.ndarray) -> np.ndarray:
    """Parameter k's bound after the steps: derived from both sides' gradients at every step
    (adam_bound), or, where not every step's gradient is compared, Adam's largest move."""
    if len(ours) == len(lrs) and all(k in s for s in ours) and all(k in s for s in theirs):
        return adam_bound(lrs, [s[k] for s in ours], [s[k] for s in theirs], beta2=optimizer.defaults["betas"][1],
                          eps=optimizer.defaults["eps"], param=param)
    return np.full(param.shape, ADAM_UNIT * sum(lrs))


def _steps(d) -> int:
    return sum(1 for k in d.files if k.startswith("input/step") and k.endswith("/obs_uint8"))


def _ref_stage1(ours: str) -> str:
    """The reference's idm.<name> / wm.<name> of our LAM parameter name."""
    module, _, rest = ours.partition(".")
    if module == "fdm":
        return "wm." + rest
    for pattern, repl in ((r"^encoder\.stages\.(\d)\.res\.(\d)\.", r"conv_stack.\1.res_block\2."),
                          (r"^encoder\.stages\.(\d)\.conv\.", r"conv_stack.\1.conv."), (r"^encoder\.fc\.", "fc."),
                          (r"^head\.", "policy_head."), (r"^vq\.codebook$", "vq.embedding")):
        rest = _mapped(rest, [(pattern, repl)])
    return "idm." + rest


def _close_bound(report: Report, fixture: str, name: str, ours, theirs: np.ndarray, bound: np.ndarray) -> None:
    ours = ours.detach().numpy() if torch.is_tensor(ours) else np.asarray(ours)
    diff = np.abs(ours.astype(np.float64).reshape(theirs.shape) - theirs)
    worst = np.unravel_index(np.argmax(diff - bound), diff.shape)  # the element nearest its bound
    report.rows.append((fixture, name, float(diff[worst]), float(bound[worst]), bool((diff <= bound).all())))


def _zero_gradient(module, prefix: str) -> set[str]:
    """The parameters whose true gradient is zero by construction: a conv's (or transposed conv's)
    bias right before a BatchNorm (in training), whose batch mean the normalisation subtracts."""
    found = set()
    for mname, m in module.named_modules():
        conv, norm = getattr(m, "conv", None), getattr(m, "norm", None)
        if isinstance(conv, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)) and isinstance(norm, torch.nn.BatchNorm2d) \
                and conv.bias is not None:
            found.add(f"{prefix}{mname}.conv.bias".replace("..", "."))
    return found


def _zero_row(report: Report, fixture: str, name: str, ours, theirs: np.ndarray, scale: float,
              roundoff: float = 0.0) -> None:
    """A zero-gradient parameter: both sides' gradients are round-off, below ZERO_FLOOR x the step's
    norm (plus the round-off measured for it, where measured)."""
    worst = max(float(np.linalg.norm(theirs)), float(torch.linalg.vector_norm(ours)) if ours is not None else np.inf)
    bound = ZERO_FLOOR * scale + roundoff
    report.rows.append((fixture, name, worst, bound, worst <= bound))


# A gradient that is zero but for round-off measures up to ~5e-6 of the step's whole gradient norm
# (stage 1 with the fixtures' scaled FDM); a real one is orders above.
ZERO_FLOOR = 3e-5


def _check_stage1_buffers(report: Report, fixture: str, buffers: dict, d, bounds: dict, roundoff: dict) -> None:
    """The VQ's EMA buffers and the FDM's BatchNorm statistics after the steps, within their
    measured round-off. A BatchNorm right after a conv whose bias is free (zero gradient: Adam moves
    it by round-off) records that bias in its running mean: bounded by the bias's and the weights'
    bounds (momentum 0.1 per step)."""
    steps = _steps(d)
    for theirs, ours in buffers.items():
        key = f"output/buffer_after/{theirs}"
        if key not in d.files:
            continue
        atol = ATOL + roundoff[theirs]
        if theirs.endswith("norm.running_mean"):
            conv = theirs.removesuffix("norm.running_mean").removeprefix("wm.")
            b, w = bounds.get(f"fdm.{conv}conv.bias"), bounds.get(f"fdm.{conv}conv.weight")
            if b is not None:
                # |input| <= 0.5 into the first conv; deeper convs read normalised activations (|x| ~ 1): 4 is generous
                x = 0.5 if conv == "down.0." else 4.0
                w_part = w.reshape(len(b), -1).sum(1) * x if w is not None else 0.0
                atol = atol + (1 - 0.9 ** steps) * (b + w_part)
        report.close(fixture, f"buffer_after/{theirs}", ours, d[key], rtol=RTOL_BUFFERS, atol=atol)


RTOL_BUFFERS = 1e-4


# -- stage 2 ---------------------------------------------------------------------------------------------

def check_stage2_train(d, name: str, report: Report) -> None:
    """Stage 2 as stages/bc.py runs it (its make_step; the labels by latent.idm_latents, as the
    stage computes them)."""
    from lapo_fast.latent.labels import idm_latents
    from lapo_fast.stages import bc as stage

    idm_state = _prefixed(d, "idm", _IDM_MAP)
    idm = LatentIDM(frames=3, impala_scale=idm_state["encoder.stages.0.conv.weight"].shape[0] // 16)
    _load(idm, idm_state, ("vq.initialized", "vq.refills"))
    pol_state = _prefixed(d, "policy", _POLICY_MAP)
    cfg = replace(resolve(BCConfig, "paper"), impala_scale=pol_state["trunk.stages.0.conv.weight"].shape[0] // 16)
    policy = _load(LatentPolicy(impala_scale=cfg.impala_scale), pol_state, ("action_head.",))
    policy, idm = policy.to(memory_format=memory_format()), idm.to(memory_format=memory_format())  # as the stages
    for head in (policy.action_head, policy.value_head):  # as stage 2 does
        head.requires_grad_(False)
    named = {k: p for k, p in policy.named_parameters() if p.requires_grad}
    start = {k: v.detach().clone() for k, v in named.items()}
    to_ref = _ref_policy
    optimizer, schedule = cfg.optimizer(policy.parameters())
    step = stage.make_step(policy, policy, optimizer, schedule, cfg, "cpu")
    lrs = _start(optimizer, schedule, d)
    steps = _steps(d)
    ref = _stored_grads(d, "grad", named, to_ref, steps)
    replay = _Replay(start, cfg.optimizer, cfg.grad_clip, d) if all(len(g) == len(named) for g in ref) else None
    grads = _Grads(named)
    ours_g, theirs_g = [], []
    policy.train()
    for i in range(steps):
        o = f"output/step{i}/"
        if replay is not None and i > 0:
            replay.force(named)
        windows = _hwc(d[f"input/step{i}/obs_uint8"])
        target = idm_latents(idm, windows.flatten(0, 1), np.arange(len(windows)) * windows.shape[1], 1)
        report.close(name, f"step{i}/la_target", target, d[o + "la_target"])
        out = step({"obs": windows[:, -2], "target": torch.from_numpy(target)})
        pre = grads.take()
        report.close(name, f"step{i}/loss", out["loss"], d[o + "loss"])
        report.close(name, f"step{i}/lr", lrs[i], d[o + "lr"])
        if replay is None and i > 0:  # free trajectories drift apart (see _Replay): the parameters say the rest
            continue
        scale = float(np.sqrt(sum(np.square(g.numpy().astype(np.float64)).sum() for g in ref[i].values())))
        for k, theirs in ref[i].items():
            report.relative(name, f"step{i}/grad/{to_ref(k)}", pre.get(k), theirs.numpy(), scale=scale)
            # the reference does not clip stage 2: what the optimiser stepped on is the raw gradient
            report.relative(name, f"step{i}/grad_stepped/{to_ref(k)}", named[k].grad, theirs.numpy(), scale=scale)
        ours_g.append({k: named[k].grad.detach().numpy().copy() for k in ref[i]})
        theirs_g.append({k: v.numpy() for k, v in ref[i].items()})
        if replay is not None:
            replay.step(ref[i])
    grads.remove()
    total = float(sum(np.sqrt(sum(np.square(g.astype(np.float64)).sum() for g in s.values())) for s in theirs_g))
    _check_adam(report, name, "output/adam/", optimizer, named, d, to_ref, total)
    for k, p in named.items():
        key = f"output/param_after/{to_ref(k)}"
        if key not in d.files:
            continue
        theirs = d[key]
        bound = _param_bound(k, lrs, ours_g, theirs_g, optimizer, theirs)
        _close_bound(report, name, f"param_after/{to_ref(k)}", p, theirs, bound)
    _check_schedule(report, name, d, lambda s: [cfg.lr * schedule.lr_lambdas[0](s)])
    if replay is not None:
        replay.check(report, name, d, to_ref, "output/param_after/")


def _ref_policy(ours: str) -> str:
    """The reference's Policy name of our LatentPolicy parameter."""
    for pattern, repl in ((r"^trunk\.stages\.(\d)\.res\.(\d)\.", r"conv_stack.\1.res_block\2."),
                          (r"^trunk\.stages\.(\d)\.conv\.", r"conv_stack.\1.conv."), (r"^trunk\.fc\.", "fc."),
                          (r"^latent_head\.", "policy_head.")):
        ours = _mapped(ours, [(pattern, repl)])
    return ours


# -- stage 3b --------------------------------------------------------------------------------------------

_HEADS = {"action_head": "policy_head_rl", "value_head": "value_head", "fc_rl": "fc_rl"}


def _agent(d) -> DecodedPolicy:
    """Stage 3b's agent holding the fixture's stage-3 policy (the reference's names mapped to ours)."""
    scale = _scale(d, "param/conv_stack.0.conv.weight", 16)
    latent = LatentPolicy(impala_scale=scale)
    agent = DecodedPolicy(latent)
    state = {}
    for key in d.files:
        kind, _, ref = key.partition("/")
        if kind != "param":
            continue
        if ref.startswith("conv_stack."):
            ours = "conv." + _mapped(ref, [(r"^conv_stack\.(\d)\.res_block(\d)\.", r"\1.res.\2."),
                                            (r"^conv_stack\.", "")])
        elif ref.startswith("fc_sl.0."):
            ours = "fc_sl." + ref.removeprefix("fc_sl.0.")
        elif ref.startswith(("policy_head_sl.", "policy_head.")):
            ours = "latent_head." + ref.split(".", 1)[1]
        elif ref.startswith("policy_head_rl."):
            ours = "action_head." + ref.removeprefix("policy_head_rl.")
        elif ref.startswith("decoder."):
            ours = "decoder.net." + ref.removeprefix("decoder.")
        elif ref.startswith(("fc.", "fc_rl.")):
            ours = "fc_rl." + ref.split(".", 1)[1]
        else:
            ours = ref
        state[ours] = torch.from_numpy(np.array(d[key]))
    missing, unexpected = agent.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"stage-3 key map incomplete: ours missing {missing[:5]}, theirs unused {unexpected[:5]}")
    return agent.to(memory_format=memory_format())  # as stage 3b


def check_stage3_train(d, name: str, report: Report) -> None:
    """Stage 3b as stages/finetune.py runs it: the online decoder's whole retraining (OnlineDecoder.fit,
    in the reference's shuffle order from its reset weights), the lr schedules (its heads_optimizer), PPO
    updates (ppo_step under the reference's clip) and GAE."""
    from lapo_fast.latent import OnlineDecoder
    from lapo_fast.runtime.ppo import gae, ppo_step
    from lapo_fast.stages.finetune import heads_optimizer

    cfg = resolve(FinetuneConfig, "paper")
    agent = _agent(d)
    # -- the decoder's retraining
    online = OnlineDecoder(LatentIDM(impala_scale=1), cfg, "cpu")  # its IDM unused: the labels are given
    online.latents = [torch.from_numpy(d["input/decoder/latents"])]
    online.actions = [torch.from_numpy(d["input/decoder/actions"])]
    reset = [f.split("/", 3)[3] for f in d.files if f.startswith("input/decoder/reset/")]
    agent.decoder.load_state_dict({"net." + k: torch.from_numpy(d[f"input/decoder/reset/{k}"]) for k in reset})
    orders = iter(torch.from_numpy(d["input/decoder/order"]).split(len(d["input/decoder/actions"])))

    def recorded(n: int) -> torch.Tensor:
        order = next(orders, None)
        if order is None:
            raise _MoreEpochs()
        return order

    try:
        losses = online.fit(agent.decoder, recorded)
        report.close(name, "decoder/losses", losses, d["output/decoder/losses"], rtol=1e-4, atol=1e-6)
    except (_MoreEpochs, ValueError) as e:
        report.rows.append((name, f"decoder/losses ({type(e).__name__}: more epochs or another size than the "
                                  "reference's)", float("inf"), 0.0, False))
    for key, value in agent.decoder.state_dict().items():
        ref = "decoder." + key.removeprefix("net.")
        report.close(name, f"decoder/param_after/{ref}", value, d[f"output/decoder/param_after/{ref.split('.', 1)[1]}"],
                     rtol=1e-3, atol=1e-5)
    # PPO starts from the reference's decoder as its retraining left it (its gradients: ours, as left by fit)
    with torch.no_grad():
        for key, p in agent.decoder.named_parameters():
            p.copy_(torch.from_numpy(d[f"param/decoder.{key.removeprefix('net.')}"]))
    # -- the schedules: ours stepped once per update of num_envs x rollout env steps
    batch = cfg.num_envs * cfg.rollout
    optimizer, schedule, _ = heads_optimizer(agent, cfg, batch)
    lrs = [[g["lr"] for g in optimizer.param_groups]]
    at = d["output/schedule/at"]
    for _ in range(int(at.max()) // batch):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            schedule.step()
        lrs.append([g["lr"] for g in optimizer.param_groups])
    _check_schedule(report, name, d, lambda s: lrs[s // batch] if s % batch == 0 else [np.nan] * 3)
    # -- PPO updates at the fixture's env step
    at_step = _ppo_step_of(d)
    optimizer, schedule, _ = heads_optimizer(agent, cfg, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(at_step // batch):
            schedule.step()
    for g, ref in zip(optimizer.param_groups, ("policy_head", "value_head", "linear_layer")):
        report.close(name, f"ppo/lr/{ref}", g["lr"], d[f"output/ppo/lr/{ref}"], rtol=1e-6, atol=0.0)
    agent.conv.requires_grad_(True)  # as train_finetune does under reference_clip
    agent.decoder.requires_grad_(True)
    heads = {f"{_HEADS[m]}.{k}": p for m in _HEADS for k, p in getattr(agent, m).named_parameters()}
    grads = _Grads(heads)
    obs = torch.from_numpy(d["input/ppo/obs_u8"]).permute(0, 2, 3, 1)
    from lapo_fast.data import prepare_obs

    inputs = [torch.from_numpy(d[f"input/ppo/{k}"]) for k in ("logprobs", "adv", "returns", "values")]
    actions = torch.from_numpy(d["input/ppo/actions"]).long()
    norms = d["output/ppo/clip_total_norm"]
    ours_g, theirs_g, step_lrs = [], [], []
    for u in range(len(norms)):
        o = f"output/ppo/update{u}/"
        feats = agent.conv_features(prepare_obs(obs))  # the trunk runs, with its gradient, in every minibatch
        pg, v, ent, clipfrac, norm = ppo_step(agent, optimizer, list(agent.parameters()), cfg, feats, actions, *inputs)
        for key, ours in (("pg_loss", pg), ("v_loss", v), ("entropy", ent), ("clipfrac", clipfrac)):
            report.close(name, f"ppo/update{u}/{key}", ours, d[o + key])
        report.close(name, f"ppo/update{u}/clip_total_norm", norm, norms[u])
        pre = grads.take()
        coef = min(1.0, cfg.grad_clip / (float(norms[u]) + 1e-6))
        step_o, step_t = {}, {}
        for k, p in heads.items():
            key = f"{o}grad_pre_clip/{k}"
            if key in d.files:
                report.relative(name, f"ppo/update{u}/grad_pre_clip/{k}", pre.get(k), d[key], scale=float(norms[u]),
                                rtol=PPO_GRAD_RTOL)
                report.relative(name, f"ppo/update{u}/grad_post_clip/{k}", p.grad, d[key] * coef,
                                scale=float(norms[u]) * coef, rtol=PPO_GRAD_RTOL)
                step_o[k], step_t[k] = p.grad.detach().numpy().copy(), d[key] * coef
        ours_g.append(step_o)
        theirs_g.append(step_t)
        step_lrs.append([g["lr"] for g in optimizer.param_groups])
    grads.remove()
    _check_adam(report, name, "output/ppo/adam/", optimizer, heads, d, lambda k: k, float(norms.sum()),
                rtol=PPO_GRAD_RTOL)
    group_of = {k: i for i, m in enumerate(_HEADS) for k in heads if k.startswith(_HEADS[m] + ".")}
    for k, p in heads.items():
        theirs = d[f"output/ppo/param_after/{k}"]
        lr = [row[group_of[k]] for row in step_lrs]
        bound = _param_bound(k, lr, ours_g, theirs_g, optimizer, theirs)
        _close_bound(report, name, f"ppo/param_after/{k}", p, theirs, bound)
    # -- GAE (the reference's dones[t]: o_t starts an episode; ours: the episode ended with step t)
    g = {k: torch.from_numpy(d[f"input/gae/{k}"]) for k in ("rewards", "dones", "values", "next_value", "next_done")}
    dones = torch.cat([g["dones"][1:], g["next_done"][None]])
    adv, ret = gae(g["rewards"], torch.cat([g["values"], g["next_value"][None]]), dones, cfg.gamma, cfg.gae_lambda)
    report.close(name, "gae/adv", adv, d["output/gae/adv"])
    report.close(name, "gae/returns", ret, d["output/gae/returns"])
    if "output/ppo/num_updates" in d.files:
        _check_stage3_rest(d, name, report, cfg)


def _check_stage3_rest(d, name: str, report: Report, cfg: FinetuneConfig) -> None:
    """The update count, the rewards' scaling and the online decoder's labels."""
    from lapo_fast.latent import OnlineDecoder
    from lapo_fast.runtime.ppo import scaled_rewards

    report.exact(name, f"ppo/updates in {int(d['output/ppo/env_steps']):,} env steps",
                 replace(cfg, env_steps=int(d["output/ppo/env_steps"])).planned_steps(), d["output/ppo/num_updates"])
    rewards, dones = d["input/rewards/rewards"], d["input/rewards/dones"]
    env = scaled_rewards(_replayed(rewards, dones), cfg)
    scaled = np.stack([env.step(np.zeros(rewards.shape[1], np.int64))[1] for _ in range(len(rewards))])
    report.close(name, "rewards/scaled (NormalizeReward, clip 10)", scaled, d["output/rewards/scaled"], rtol=1e-5,
                 atol=1e-6)
    # the labels of two rollouts, as the reference's rolling buffer spans them
    state = {_mapped(k.split("/", 3)[3], _IDM_MAP): torch.from_numpy(d[k]) for k in d.files
             if k.startswith("input/labels/idm/")}
    idm = _load(LatentIDM(frames=3, impala_scale=state["encoder.stages.0.conv.weight"].shape[0] // 16), state,
                ("vq.initialized", "vq.refills")).to(memory_format=memory_format())
    online = OnlineDecoder(idm, cfg, "cpu")
    frames, actions = torch.from_numpy(d["input/labels/frames"]), torch.from_numpy(d["input/labels/actions"])
    T, N = len(actions) // 2, actions.shape[1]
    for r in range(2):
        online.add(frames[:, r * T:(r + 1) * T + 1], actions[r * T:(r + 1) * T], torch.zeros(T, N))
    ours_la, ours_ta = torch.cat(online.latents), torch.cat(online.actions)
    theirs_ta = d["output/labels/train_ta"]
    n = len(theirs_ta)  # ours hold the rollout's last transition too: the reference labels it a step later
    report.exact(name, "labels/count (ours less the last step's)", len(ours_ta) - N, n)
    if len(ours_ta) - N == n:
        report.exact(name, "labels/actions", ours_ta[:n], theirs_ta)
        report.close(name, "labels/latents", ours_la[:n], d["output/labels/train_la"])


def _replayed(rewards: np.ndarray, dones: np.ndarray):
    """A gymnasium vector env replaying stored rewards and episode ends (the reward scaling's input)."""
    import gymnasium

    class Replayed(gymnasium.vector.VectorEnv):
        def __init__(self):
            self.t, self.num_envs = 0, rewards.shape[1]
            self.observation_space = self.single_observation_space = gymnasium.spaces.Box(0, 1, (1,))
            self.action_space = self.single_action_space = gymnasium.spaces.Discrete(2)

        def step(self, actions):
            r, done = rewards[self.t], dones[self.t]
            self.t += 1
            return np.zeros((self.num_envs, 1)), r, done, np.zeros_like(done), {}

    return Replayed()


class _MoreEpochs(Exception):
    """Our decoder training asked for more epochs than the reference ran."""


def _ppo_step_of(d) -> int:
    """The env step of the fixture's PPO updates: the one whose lrs the reference's optimiser held."""
    want = np.array([float(d[f"output/ppo/lr/{g}"]) for g in ("policy_head", "value_head", "linear_layer")])
    for s, row in zip(d["output/schedule/at"], d["output/schedule/lr"]):
        if np.allclose(row, want, rtol=1e-9, atol=0):
            return int(s)
    raise ValueError("stage3_train: the PPO updates' lrs are not a row of the schedule table; remake the fixtures")
