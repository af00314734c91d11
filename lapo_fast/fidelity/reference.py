"""Fidelity to the authors' code, proved with its own numbers: load the weights and inputs that
the reference LAPO code saved (shared/fixtures/lapo_reference, made by running it; its README says
which call made each file), run our models and training steps on them, and compare every output.

    lapo-fast check-reference DIR

Tolerances: forward outputs and losses rtol 1e-4 / atol 1e-5, VQ indices exact; gradients per
tensor ||ours - theirs|| <= 1e-2 ||theirs|| + 3e-6 x the step's gradient norm (GRAD_RTOL,
GRAD_FLOOR); parameters after one step from the same weights within 2.2 x lr (Adam moves each
element by about lr whatever its gradient: only the gradients prove it). The training
trajectories (several steps, stage 1's older one- and two-step files among them) are checked by
training.py, with bounds derived from the gradients and the round-off it measures.

Key maps: the reference's parameter names -> ours. The FDM (LapoFDM) uses the reference's names.
Our LatentPolicy has a true-action head the reference's stage-2 policy lacks (stage 3 adds it), and
our VQ two bookkeeping buffers (k-means flag, refill count); those keep their initial values.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from lapo_fast.config import BCConfig, FinetuneConfig, resolve
from lapo_fast.models import DecodedPolicy, LapoFDM, LatentIDM, LatentPolicy, stack_frames
from lapo_fast.layout import reference_layout
from lapo_fast.runtime.optim import optimizer_step
from lapo_fast.runtime.ppo import ppo_step

RTOL, ATOL = 1e-4, 1e-5
# Gradients, per tensor: the norm of the difference within 1% of the reference's (fp32 round-off,
# amplified by the FDM's BatchNorms on a 4-window batch, measures up to ~0.2%; a 5% error in one
# tensor must fail), plus a floor of 3e-6 x the step's whole gradient norm for tensors the maths
# makes zero (a conv bias before a BatchNorm: its gradient is pure round-off on both sides, up to
# 1.4e-6 x the norm measured at the paper size).
GRAD_RTOL, GRAD_FLOOR = 1e-2, 3e-6
_IMPALA = [(r"conv_stack\.(\d)\.conv\.", r"stages.\1.conv."),
           (r"conv_stack\.(\d)\.res_block(\d)\.", r"stages.\1.res.\2.")]
_IDM_MAP = [(a, "encoder." + b) for a, b in _IMPALA] + [
    (r"^fc\.", "encoder.fc."), (r"^policy_head\.", "head."), (r"^vq\.embedding$", "vq.codebook")]
_POLICY_MAP = [(a, "trunk." + b) for a, b in _IMPALA] + [(r"^fc\.", "trunk.fc."), (r"^policy_head\.", "latent_head.")]
NOT_YET: dict[str, str] = {}  # fixtures no check reads yet, and why


class Report:
    """Rows of (fixture, output, max |difference|, bound, ok)."""

    def __init__(self):
        self.rows: list[tuple[str, str, float, float, bool]] = []
        self.skipped: list[tuple[str, str]] = []
        self.near_ties: set[int] = set()  # rows off in our layout, exact in the reference's (see check_reference)
        self.made_by = ""  # the torch build and CPU kernels the fixtures were made with (where recorded)

    def close(self, fixture: str, name: str, ours, theirs, *, rtol: float = RTOL, atol: float = ATOL) -> None:
        ours = ours.detach().cpu().numpy() if torch.is_tensor(ours) else np.asarray(ours)
        theirs = np.asarray(theirs)
        ours = ours.reshape(theirs.shape)
        diff = np.abs(ours.astype(np.float64) - theirs.astype(np.float64))
        bound = atol + rtol * np.abs(theirs.astype(np.float64))
        worst = float(diff.max()) if diff.size else 0.0
        self.rows.append((fixture, name, worst, float(bound.max()) if bound.size else atol,
                          bool((diff <= bound).all())))

    def relative(self, fixture: str, name: str, ours, theirs, *, scale: float, rtol: float = GRAD_RTOL,
                 floor: float = GRAD_FLOOR, roundoff: float = 0.0) -> None:
        """A whole tensor at once: ||ours - theirs|| <= rtol ||theirs|| + floor x scale (the row's
        'max |diff|' is then the norm of the difference). For gradients, where elementwise bounds
        either pass a scaled tensor or fail on round-off in its smallest elements; `scale` is the
        whole step's gradient norm; `roundoff`: an allowance measured for this tensor (added)."""
        if ours is None:
            self.rows.append((fixture, name, float("inf"), 0.0, False))
            return
        ours = (ours.detach().cpu().numpy() if torch.is_tensor(ours) else np.asarray(ours)).astype(np.float64)
        theirs = np.asarray(theirs, np.float64)
        diff = float(np.linalg.norm(ours.reshape(theirs.shape) - theirs))
        bound = rtol * float(np.linalg.norm(theirs)) + floor * scale + roundoff
        self.rows.append((fixture, name, diff, bound, diff <= bound))

    def exact(self, fixture: str, name: str, ours, theirs) -> None:
        self.close(fixture, name, ours, theirs, rtol=0.0, atol=0.0)

    @property
    def ok(self) -> bool:
        return all(r[4] for r in self.rows) and not self.skipped

    def table(self) -> str:
        lines = [f"{'fixture':<22} {'output':<44} {'max |diff|':>11} {'bound':>10}  result"]
        result = lambda i, ok: "near-tie" if i in self.near_ties else "ok" if ok else "FAIL"  # noqa: E731
        lines += [f"{f:<22} {n:<44} {d:>11.3g} {b:>10.3g}  {result(i, ok)}"
                  for i, (f, n, d, b, ok) in enumerate(self.rows)]
        lines += [f"{f:<22} {'(not checked)':<44} {'':>11} {'':>10}  {why}" for f, why in self.skipped]
        return "\n".join(lines)


def _state(d, mapping=()) -> dict[str, torch.Tensor]:
    """The reference state_dict stored in a fixture, its names mapped to ours."""
    out = {}
    for key in d.files:
        kind, _, name = key.partition("/")
        if kind in ("param", "buffer"):
            out[_mapped(name, mapping)] = torch.from_numpy(np.array(d[key]))
    return out


def _load(model: torch.nn.Module, state: dict, ours_only: tuple[str, ...] = ()) -> torch.nn.Module:
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(ours_only)]
    if missing or unexpected:
        raise ValueError(f"reference key map incomplete: ours missing {missing[:5]}, theirs unused {unexpected[:5]}")
    return model


def _scale(d, key: str, base: int) -> int:
    return d[key].shape[0] // base


def _idm(d) -> LatentIDM:
    idm = LatentIDM(frames=3, impala_scale=_scale(d, "param/conv_stack.0.conv.weight", 16))
    return _load(idm, _state(d, _IDM_MAP), ("vq.initialized", "vq.refills"))


def _fdm(d) -> LapoFDM:
    return _load(LapoFDM(6, 128, width=d["param/down.0.conv.weight"].shape[0]), _state(d))


def _policy(d) -> LatentPolicy:
    policy = LatentPolicy(impala_scale=_scale(d, "param/conv_stack.0.conv.weight", 16))
    return _load(policy, _state(d, _POLICY_MAP), ("action_head.",))


def check_idm(d, name: str, report: Report) -> None:
    obs = torch.from_numpy(d["input/obs"])
    for mode in ("eval", "train"):
        idm = _idm(d).train(mode == "train")
        with torch.set_grad_enabled(mode == "train"):
            out = idm(obs)
        o = f"output/{mode}/"
        report.close(name, f"{mode}/la", out.latent, d[o + "la"])
        report.close(name, f"{mode}/la_q", out.quantized, d[o + "la_q"])
        report.exact(name, f"{mode}/la_qinds", out.indices, d[o + "la_qinds"][..., 0])
        report.close(name, f"{mode}/vq_loss", out.vq_loss, d[o + "vq_loss"])
        report.close(name, f"{mode}/vq_perp", out.perplexity, d[o + "vq_perp"])
        for ours, theirs in (("codebook", "embedding"), ("ema_count", "ema_count"), ("ema_weight", "ema_weight")):
            report.close(name, f"{mode}/buffer_after/vq.{theirs}", getattr(idm.vq, ours),
                         d[o + f"buffer_after/vq.{theirs}"])


def check_fdm(d, name: str, report: Report) -> None:
    frames, action = stack_frames(torch.from_numpy(d["input/state_seq"])), torch.from_numpy(d["input/action"])
    target = torch.from_numpy(d["input/target"])
    for mode in ("eval", "train"):
        fdm = _fdm(d).train(mode == "train")
        with torch.set_grad_enabled(mode == "train"):
            pred = fdm(frames, action)
        report.close(name, f"{mode}/wm_pred", pred, d[f"output/{mode}/wm_pred"])
        report.close(name, f"{mode}/loss", F.mse_loss(pred, target), d[f"output/{mode}/loss"])
        if mode == "train":
            for key, value in fdm.state_dict().items():
                if "running" in key:
                    report.close(name, f"train/buffer_after/{key}", value, d[f"output/train/buffer_after/{key}"])


def check_policy(d, name: str, report: Report) -> None:
    policy = _policy(d).eval()
    obs = torch.from_numpy(d["input/obs"])
    with torch.no_grad():
        feats = policy.features(obs)
        latent = policy.latent_head(feats)
        report.close(name, "latent_action", latent, d["output/latent_action"])
        report.close(name, "value", policy.value_head(feats), d["output/value"])
        report.close(name, "stage2_loss", F.mse_loss(latent, torch.from_numpy(d["input/la_target"])),
                     d["output/stage2_loss"])


def check_stage1(d, name: str, report: Report, idm_d, fdm_d) -> None:
    """One or two of our stage-1 steps from the reference's initial weights, all on one batch: the
    training trajectories' check (training.check_stage1_train) on the older files' layout."""
    from .training import check_stage1_train

    check_stage1_train(_OlderStage1(d, idm_d, fdm_d), name, report)


class _OlderStage1:
    """stage1_step / stage1_2steps files read as a stage1_train one: the weights from the idm and
    fdm files, the same windows at every step from step 0, 'output/' for a single step's 'output/step0/'."""

    def __init__(self, d, idm_d, fdm_d):
        self.d, self.steps = d, (2 if "output/step1/loss" in d.files else 1)
        self.extra = {f"{k.split('/')[0]}/{model}.{k.split('/', 1)[1]}": f[k]
                      for model, f in (("idm", idm_d), ("wm", fdm_d)) for k in f.files
                      if k.startswith(("param/", "buffer/"))}
        self.extra["input/start_step"] = np.asarray(0)
        for i in range(self.steps):
            self.extra[f"input/step{i}/obs_uint8"] = idm_d["input/obs_uint8"]
        self.files = list(self.extra) + [self._new(k) for k in d.files]

    def _new(self, key: str) -> str:
        if self.steps == 1 and key.startswith("output/") and not key.startswith(("output/param_after/",
                                                                                 "output/buffer_after/")):
            key = "output/step0/" + key.removeprefix("output/")
        return key.replace("/batch/la_qinds", "/la_qinds")

    def __getitem__(self, key: str):
        if key in self.extra:
            return self.extra[key]
        old = key.replace("/la_qinds", "/batch/la_qinds")
        if self.steps == 1 and old.startswith("output/step0/"):
            old = "output/" + old.removeprefix("output/step0/")
        return self.d[old]


def _ours_stage1(theirs: str) -> str:
    """Our stage-1 parameter name of the reference's idm.<name> or wm.<name>."""
    module, _, param = theirs.partition(".")
    return f"idm.{_mapped(param, _IDM_MAP)}" if module == "idm" else f"fdm.{param}"


def _mapped(name: str, mapping) -> str:
    for pattern, repl in mapping:
        name = re.sub(pattern, repl, name)
    return name


def check_stage2(d, name: str, report: Report, idm_d, policy_d) -> None:
    """One of our stage-2 steps (the paper preset's optimiser and schedule) on the batch."""
    cfg = resolve(BCConfig, "paper")
    idm, policy = _idm(idm_d).eval(), _policy(policy_d)
    for head in (policy.action_head, policy.value_head):  # as stage 2 does
        head.requires_grad_(False)
    optimizer, schedule = cfg.optimizer(policy.parameters())
    obs = torch.from_numpy(d["input/obs"])
    with torch.no_grad():
        target = idm(obs).latent
    report.close(name, "la_target", target, d["output/la_target"])
    lr = schedule.get_last_lr()[0]
    policy.train()
    preds = policy(obs[:, -2])
    loss = F.mse_loss(preds, target)
    names, params = zip(*policy.named_parameters())
    grads: dict = {}
    optimizer_step(loss, list(params), optimizer, schedule, cfg.grad_clip, record=grads)
    mine_grad = dict(zip(names, grads["pre_clip"]))  # stage 2 does not clip (grad_clip 0, as the reference)
    stored = [k for k in d.files if k.startswith("output/grad/")]
    scale = _joint_norm(d, stored)
    for key in stored:
        theirs = key.split("/", 2)[2]
        report.relative(name, f"grad/{theirs}", mine_grad[_mapped(theirs, _POLICY_MAP)], d[key], scale=scale)
    report.close(name, "preds", preds, d["output/preds"])
    report.close(name, "loss", loss, d["output/loss"])
    report.close(name, "lr", lr, d["output/lr"])
    mine = dict(policy.named_parameters())
    for key in d.files:
        if key.startswith("output/param_after/"):
            theirs = key.split("/", 2)[2]
            report.close(name, f"param_after/{theirs}", mine[_mapped(theirs, _POLICY_MAP)], d[key], rtol=0.0,
                         atol=2 * float(d["output/lr"]))


def check_stage3(d, name: str, report: Report) -> None:
    """Stage 3b's agent at its start (the reference's stage-3 policy built from a latent policy),
    and one supervised step of its online decoder."""
    from lapo_fast.latent import decoder_step

    latent = _load(LatentPolicy(impala_scale=_scale(d, "param/conv_stack.0.conv.weight", 16)),
                   {k: v for k, v in _state(d, _POLICY_MAP).items()
                    if not k.startswith(("decoder.", "fc_", "policy_head_"))},
                   ("action_head.",))
    agent = DecodedPolicy(latent)
    agent.decoder.load_state_dict({k.replace("decoder.", "net."): v for k, v in _state(d).items()
                                   if k.startswith("decoder.")})
    report.exact(name, "policy_head_rl (zero at start)", agent.action_head.weight, d["param/policy_head_rl.weight"])
    # The value head a new policy starts with: the reference's layer_init (orthogonal, norm sqrt(2),
    # zero bias), compared by its norm (the weights themselves are random).
    fresh = LatentPolicy(impala_scale=1).value_head
    report.close(name, "value_head init (weight norm)", fresh.weight.norm(),
                 np.linalg.norm(d["param/value_head.weight"]))
    report.exact(name, "value_head init (bias)", fresh.bias, np.zeros_like(d["param/value_head.bias"]))
    obs, action = torch.from_numpy(d["input/obs"]), torch.from_numpy(d["input/action"])
    with torch.no_grad():
        feats = agent.conv_features(obs)
        latent_action = agent.latent(feats)
        logits, value = agent.logits_value(feats)
        dist = torch.distributions.Categorical(logits=logits)
    for key, ours in (("act/conv_stack", feats), ("act/fc_rl", agent.fc_rl(feats)),
                      ("act/fc_sl", torch.relu(agent.fc_sl(feats))),
                      ("latent_action", latent_action), ("logits_sl", agent.decoder(latent_action)), ("logits", logits),
                      ("log_softmax", dist.logits), ("logprob", dist.log_prob(action)), ("entropy", dist.entropy()),
                      ("value", value)):
        report.close(name, key, ours, d[f"output/{key}"])
    cfg = resolve(FinetuneConfig, "paper")
    optimizer = torch.optim.Adam(agent.decoder.parameters(), lr=cfg.decoder_lr)
    agent.decoder.requires_grad_(True)
    outputs, loss = decoder_step(agent.decoder, optimizer, torch.from_numpy(d["input/decoder_la"]), action,
                                 label_smoothing=cfg.label_smoothing)
    report.close(name, "decoder_sl/outputs", outputs, d["output/decoder_sl/outputs"])
    report.close(name, "decoder_sl/loss", loss, d["output/decoder_sl/loss"])
    for key, value in agent.decoder.state_dict().items():
        report.close(name, f"decoder_sl/param_after/{key}", value,
                     d[f"output/decoder_sl/param_after/{_decoder_name(key)}"], rtol=0.0, atol=2e-3)
    stored = [f"output/decoder_sl/grad/{_decoder_name(k)}" for k, _ in agent.decoder.named_parameters()]
    if all(k in d.files for k in stored):  # the step's gradients (fixtures made since they are stored)
        scale = _joint_norm(d, stored)
        for (key, param), theirs in zip(agent.decoder.named_parameters(), stored):
            report.relative(name, f"decoder_sl/grad/{key}", param.grad, d[theirs], scale=scale)
    if "output/ppo/clip_total_norm" in d.files:
        _check_stage3_ppo(d, name, report, agent, obs, action)


def _check_stage3_ppo(d, name: str, report: Report, agent: DecodedPolicy, obs, action) -> None:
    """Two of our PPO updates against two of the reference's (ppo.batch_update, after the decoder
    step above), with the reference's clip: the norm it clips counts the trunk's and the decoder's
    gradients, which sit outside the optimiser and are never cleared (FinetuneConfig.reference_clip)."""
    cfg = resolve(FinetuneConfig, "paper")
    agent.conv.requires_grad_(True)  # as train_ppo does under reference_clip
    agent.decoder.requires_grad_(True)
    heads = {"policy_head_rl": agent.action_head, "value_head": agent.value_head, "fc_rl": agent.fc_rl}
    lrs = {k: float(d[f"output/ppo/lr/{g}"]) for k, g in
           zip(heads, ("policy_head", "value_head", "linear_layer"))}
    optimizer = torch.optim.Adam([{"params": m.parameters(), "lr": lrs[k]} for k, m in heads.items()],
                                 eps=cfg.adam_eps)
    inputs = [torch.from_numpy(d[f"input/ppo/{k}"]) for k in ("logprobs", "adv", "returns", "values")]
    norms = d["output/ppo/clip_total_norm"]
    for u in range(len(norms)):
        feats = agent.conv_features(obs)  # the trunk runs, with its gradient, in every minibatch
        *_, norm = ppo_step(agent, optimizer, list(agent.parameters()), cfg, feats, action.long(), *inputs)
        report.close(name, f"ppo/update{u}/clip_total_norm", norm, norms[u])
        for mod, module in heads.items():
            for key, value in module.named_parameters():
                report.close(name, f"ppo/update{u}/param_after/{mod}.{key}", value,
                             d[f"output/ppo/update{u}/param_after/{mod}.{key}"], rtol=0.0, atol=2 * (u + 1) * lrs[mod])
    scale = float(norms[-1])
    for key, param in agent.conv.named_parameters():
        theirs = _conv_name(key)
        report.relative(name, f"ppo/grad_after/{theirs}", param.grad, d[f"output/ppo/grad_after/{theirs}"], scale=scale)
    for key, param in agent.decoder.named_parameters():
        theirs = _decoder_name(key)
        report.relative(name, f"ppo/grad_after/{theirs}", param.grad, d[f"output/ppo/grad_after/{theirs}"], scale=scale)


def _joint_norm(d, keys) -> float:
    """The norm of the stored tensors `keys` taken together (a step's whole gradient)."""
    return float(np.sqrt(sum(np.square(d[k].astype(np.float64)).sum() for k in keys)))


def _decoder_name(ours: str) -> str:
    """The reference's name of our decoder parameter ('net.0.weight' -> 'decoder.0.weight')."""
    return "decoder." + ours.removeprefix("net.")


def _conv_name(ours: str) -> str:
    """The reference's conv_stack name of our trunk-stage parameter ('1.res.0.conv0.weight')."""
    stage, rest = ours.split(".", 1)
    rest = re.sub(r"^res\.(\d)\.", r"res_block\1.", rest)
    return f"conv_stack.{stage}.{rest}"


def check_reference(directory) -> Report:
    """Runs every check whose fixtures are in `directory` (both sizes where present), in our memory
    layout (channels_last). Where rows fail, it runs them all again in the reference's layout
    (contiguous): a row that then matches is a near-tie, reported as such: round-off that differs
    between the layouts flips a value at a boundary (seed 7 of the reference has a pre-ReLU
    activation of 1.9e-8 that channels_last makes -2.6e-8; the sign of a gradient that is zero but
    for round-off decides where Adam moves its parameter). A row that fails in both layouts fails."""
    report = _check_all(directory)
    if report.ok or report.skipped:
        return report
    with reference_layout():
        again = _check_all(directory)
    if [r[:2] for r in again.rows] != [r[:2] for r in report.rows]:
        raise AssertionError("check-reference: the two layouts checked different outputs")
    for i, (row, other) in enumerate(zip(report.rows, again.rows)):
        if not row[4] and other[4]:
            report.near_ties.add(i)
            report.rows[i] = (*row[:4], True)
    return report


def _check_all(directory) -> Report:
    from .training import check_stage1_train, check_stage2_train, check_stage3_train

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such fixture folder (shared/fixtures/lapo_reference holds them)")
    report = Report()
    torch.manual_seed(0)
    with torch.random.fork_rng():
        for size in ("small", "paper"):
            files = {p.stem.rsplit("_", 1)[0]: p for p in directory.glob(f"*_{size}.npz")}
            if not files:
                continue
            d = {k: np.load(p) for k, p in files.items()}
            for kind, check in (("idm", check_idm), ("fdm", check_fdm), ("policy", check_policy)):
                if kind in d:
                    check(d[kind], files[kind].name, report)
            for kind in ("stage1_step", "stage1_2steps"):
                if kind in d and "idm" in d and "fdm" in d:
                    check_stage1(d[kind], files[kind].name, report, d["idm"], d["fdm"])
            if "stage3_policy" in d:
                check_stage3(d["stage3_policy"], files["stage3_policy"].name, report)
            if "stage2_step" in d and "idm" in d and "policy" in d:
                check_stage2(d["stage2_step"], files["stage2_step"].name, report, d["idm"], d["policy"])
            for kind, check in (("stage1_train", check_stage1_train), ("stage2_train", check_stage2_train),
                                ("stage3_train", check_stage3_train)):
                if kind in d:
                    check(d[kind], files[kind].name, report)
                    if "input/made_by" in d[kind].files and not report.made_by:
                        made = json.loads(d[kind]["input/made_by"].tobytes())
                        report.made_by = f"torch {made['torch']} on {made['cpu_capability']} ({made['cpu']})"
            for kind, why in NOT_YET.items():
                if kind in d:
                    report.skipped.append((files[kind].name, why))
    if not report.rows and not report.skipped:
        raise FileNotFoundError(f"{directory}: no reference fixtures (*_small.npz, *_paper.npz) here")
    return report
