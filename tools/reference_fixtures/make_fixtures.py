#!/usr/bin/env python
"""
Build numeric fixtures from the authors' reference implementation of LAPO
("Learning to Act without Actions", Schmidt & Jiang, ICLR 2024),
github.com/schmidtdominik/LAPO, so that another implementation can check that
its models compute exactly the same functions.

Run (CPU only, ~1-2 min on 2 cores):

    WANDB_MODE=disabled $REF/venv/bin/python $REF/make_fixtures.py \
        --out $REF/fixtures

The reference code is imported from ./LAPO/lapo (next to this script). Wherever
possible the reference's own statements are executed verbatim (picked out of
stage1_idm.py / stage2_bc.py / stage3_decoding.py by their AST and exec'd in a
namespace that supplies the batch, the models and a capturing logger), so the
fixtures reflect the reference training/acting code, not a re-implementation.
"""

from __future__ import annotations

import argparse
import ast
import copy
import hashlib
import inspect
import json
import os
import platform
import subprocess
import sys
from collections import OrderedDict, deque
from functools import partial
from itertools import chain
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

HERE = Path(__file__).resolve().parent
LAPO_ROOT = Path(os.environ.get("LAPO_SRC", HERE / "LAPO"))  # the reference source tree (holds lapo/)
LAPO_DIR = LAPO_ROOT / "lapo"

# the reference code uses paths relative to lapo/ (config.yaml, expert_data/)
os.chdir(LAPO_DIR)
sys.path.insert(0, str(LAPO_DIR))

import warnings  # noqa: E402

warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

import config  # noqa: E402  (reference)
import data_loader  # noqa: E402  (reference)
import doy  # noqa: E402
import models  # noqa: E402  (reference)
import utils  # noqa: E402  (reference)
from doy import PiecewiseLinearSchedule as PLS  # noqa: E402
from tensordict import TensorDict  # noqa: E402
from torch.distributions import Categorical  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

assert config.DEVICE == "cpu", "fixtures must be generated on CPU"

SEED = 0
BATCH = 4
ENV_NAME = "starpilot"
PROCGEN_SEED = 0
WARMUP_STEPS = 40  # random-action steps before the recorded window

SIZES = OrderedDict(
    paper=dict(idm_impala_scale=4, policy_impala_scale=4, wm_scale=24),
    # wm_scale=1 fails (ResidualLayer(b, b // 2) gets 0 hidden channels -> conv error),
    # so 2 is the smallest FDM base size the reference code can run.
    small=dict(idm_impala_scale=1, policy_impala_scale=1, wm_scale=2),
)

# tensors stored after the optimiser step for the paper size (all of them for "small")
STAGE1_SELECTED = {
    "idm": [
        "conv_stack.0.conv.weight",
        "conv_stack.0.conv.bias",
        "conv_stack.2.res_block1.conv1.weight",
        "fc.bias",
        "policy_head.weight",
        "policy_head.bias",
    ],
    "wm": [
        "down.0.conv.weight",
        "down.0.conv.bias",
        "down.0.norm.weight",
        "down.0.norm.bias",
        "down.5.bias",
        "up.0.conv.weight",
        "up.5.res.res_block.1.weight",
        "final_conv.0.weight",
        "final_conv.3.weight",
        "final_conv.3.bias",
    ],
}
STAGE2_SELECTED = [
    "conv_stack.0.conv.weight",
    "conv_stack.0.conv.bias",
    "conv_stack.2.res_block1.conv1.weight",
    "fc.bias",
    "policy_head.weight",
    "policy_head.bias",
    "value_head.weight",
    "value_head.bias",
]

IDM_ACT_NAMES = ["conv_stack.0", "conv_stack.1", "conv_stack.2", "conv_stack", "fc", "policy_head"]
WM_ACT_NAMES = [f"down.{i}" for i in range(6)] + [f"up.{i}" for i in range(6)] + ["final_conv"]
POLICY_ACT_NAMES = ["conv_stack.0", "conv_stack.1", "conv_stack.2", "conv_stack", "fc"]


# ----------------------------------------------------------------------------- helpers


def to_np(t) -> np.ndarray:
    if isinstance(t, np.ndarray):
        return t
    if not isinstance(t, torch.Tensor):
        return np.asarray(t)
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.float32:
        return t.numpy().copy()
    if t.dtype in (torch.int64, torch.int32, torch.uint8, torch.bool):
        return t.numpy().copy()
    raise TypeError(f"unexpected dtype {t.dtype}")


def sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def state_arrays(module: nn.Module) -> dict:
    """param/<k> and buffer/<k> for every state_dict key (aliased modules appear under every name)."""
    out = OrderedDict()
    for k, v in module.state_dict(keep_vars=True).items():
        out[("param/" if isinstance(v, nn.Parameter) else "buffer/") + k] = to_np(v)
    return out


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # parameters() dedups aliases


def n_buffers(module: nn.Module) -> int:
    return sum(b.numel() for b in module.buffers())


class Capture:
    """forward hooks that record module outputs (do not alter numerics)"""

    def __init__(self, model: nn.Module, names):
        self.acts = OrderedDict()
        self.handles = []
        for n in names:
            mod = model.get_submodule(n)
            self.handles.append(mod.register_forward_hook(self._hook(n)))

    def _hook(self, name):
        def fn(_m, _i, o):
            self.acts[name] = o.detach().clone()

        return fn

    def remove(self):
        for h in self.handles:
            h.remove()


def pick_statements(fname: str, selectors: list):
    """Return [(selector_name, ast node, (lineno, end_lineno), first source line)]
    for the top-level statements of a reference script matched by `selectors`
    ((name, predicate(node, source_segment)) pairs), in file order."""
    src = (LAPO_DIR / fname).read_text()
    tree = ast.parse(src)
    picked = []
    for node in tree.body:
        seg = ast.get_source_segment(src, node)
        for name, pred in selectors:
            if pred(node, seg):
                picked.append((name, node, (node.lineno, node.end_lineno), seg.splitlines()[0]))
                break
    names = [p[0] for p in picked]
    assert names == [s[0] for s in selectors], (fname, names)
    return picked


def exec_nodes(fname: str, nodes, ns: dict):
    mod = ast.Module(body=list(nodes), type_ignores=[])
    exec(compile(mod, str(LAPO_DIR / fname), "exec"), ns)


def starts(prefix):
    return lambda node, seg: seg.startswith(prefix)


def is_func(name):
    return lambda node, seg: isinstance(node, ast.FunctionDef) and node.name == name


def src_lines(obj):
    lines, start = inspect.getsourcelines(obj)
    return start, start + len(lines) - 1


# ----------------------------------------------------------------------------- data


def make_frames():
    """4 windows of 3 consecutive procgen starpilot frames, plus the actions."""
    import procgen

    env = procgen.ProcgenGym3Env(
        num=BATCH,
        env_name=ENV_NAME,
        distribution_mode="easy",
        num_levels=0,
        start_level=0,
        rand_seed=PROCGEN_SEED,
    )
    rng = np.random.default_rng(SEED)
    n_frames = WARMUP_STEPS + 3
    actions = rng.integers(0, 15, size=(n_frames, BATCH)).astype(np.int64)
    frames, firsts = [], []
    for t in range(n_frames):
        _, obs, first = env.observe()
        frames.append(obs["rgb"].copy())
        firsts.append(first.copy())
        if t < n_frames - 1:
            env.act(actions[t].astype(np.int32))
    frames = np.stack(frames, 1)  # (B, n_frames, 64, 64, 3) uint8, HWC as in the dataset
    firsts = np.stack(firsts, 1)
    assert not firsts[:, -2:].any(), "episode boundary inside the recorded window"
    win_hwc = frames[:, -3:]  # (B, 3, 64, 64, 3)
    # reference data_loader._load_chunk: obs.permute(0, 3, 1, 2) -> (N, 3, 64, 64)
    win = torch.from_numpy(win_hwc).permute(0, 1, 4, 2, 3).contiguous()  # (B, T=3, C=3, 64, 64)
    ta_window = torch.from_numpy(actions[-3:].T.copy())  # (B, 3): action taken at each window frame
    return dict(
        obs_uint8=win,
        obs=data_loader.normalize_obs(win),  # reference: obs.float() / 255 - 0.5
        ta_window=ta_window,
        all_frames_hwc=frames,
        all_actions=actions,
        firsts=firsts,
    )


# ----------------------------------------------------------------------------- builders


def make_cfg(size: str):
    s = SIZES[size]
    return config.get(
        use_cli_args=False,
        override_args=[
            f"env_name={ENV_NAME}",
            "exp_name=fixtures",
            f"model.wm_scale={s['wm_scale']}",
            f"model.idm_impala_scale={s['idm_impala_scale']}",
            f"model.policy_impala_scale={s['policy_impala_scale']}",
        ],
    )


def idm_outputs(idm0, obs, mode: str):
    m = copy.deepcopy(idm0)
    m.train(mode == "train")
    cap = Capture(m, IDM_ACT_NAMES)
    if mode == "train":
        action_td, vq_loss, vq_perp = m(obs)  # grad enabled, as in stage 1
    else:
        with torch.no_grad():
            action_td, vq_loss, vq_perp = m(obs)
    cap.remove()
    out = OrderedDict()
    p = f"output/{mode}/"
    out[p + "la"] = to_np(action_td["la"])
    out[p + "la_q"] = to_np(action_td["la_q"])
    out[p + "la_qinds"] = to_np(action_td["la_qinds"])
    out[p + "vq_loss"] = to_np(vq_loss)
    out[p + "vq_perp"] = to_np(vq_perp)
    for k, v in cap.acts.items():
        out[p + "act/" + k] = to_np(v)
    if mode == "eval":
        # derived (not a reference output): gap between the nearest and 2nd-nearest code distance
        # for every latent, computed in float64 from la and the codebook, to judge argmin robustness
        N, M, D = m.vq.embedding.shape
        L = m.vq.cfg.num_discrete_latents
        x = action_td["la"].detach().double().view(len(obs), N, D, L).permute(1, 0, 3, 2).reshape(N, -1, D)
        e = m.vq.embedding.double()
        dist = (x[:, :, None, :] - e[:, None, :, :]).pow(2).sum(-1)  # (N, B*L, M)
        srt = dist.sort(-1).values
        out["output/derived/vq_dist_margin"] = to_np((srt[..., 1] - srt[..., 0]).float())
        inds64 = dist.argmin(-1).view(N, len(obs), L).permute(1, 0, 2)[..., None]
        assert torch.equal(inds64, action_td["la_qinds"]), "float64 argmin disagrees with reference indices"
    for k, v in m.state_dict().items():
        if k.startswith("vq."):
            out[p + "buffer_after/" + k] = to_np(v)
    return out, action_td, m


def wm_outputs(wm0, obs, la_q, mode: str):
    m = copy.deepcopy(wm0)
    m.train(mode == "train")
    cap = Capture(m, WM_ACT_NAMES)
    batch = TensorDict(dict(obs=obs.clone(), la_q=la_q.clone()), batch_size=len(obs))
    if mode == "train":
        loss = m.label(batch)  # reference WorldModel.label: F.mse_loss(self(obs[:, :-1], la_q), obs[:, -1])
    else:
        with torch.no_grad():
            loss = m.label(batch)
    cap.remove()
    out = OrderedDict()
    p = f"output/{mode}/"
    out[p + "wm_pred"] = to_np(batch["wm_pred"])
    out[p + "loss"] = to_np(loss)
    for k, v in cap.acts.items():
        out[p + "act/" + k] = to_np(v)
    for k, v in m.state_dict().items():
        if "running_" in k or "num_batches_tracked" in k:
            out[p + "buffer_after/" + k] = to_np(v)
    return out


def structure_table(model: nn.Module, example_inputs) -> list[dict]:
    """Every module (pre-order): type, constructor args, own parameter shapes, output shape (eval mode)."""
    m = copy.deepcopy(model).eval()
    shapes, handles = {}, []
    for name, mod in m.named_modules():
        def hook(_m, _i, o, name=name):
            shapes.setdefault(name, list(o.shape) if isinstance(o, torch.Tensor) else type(o).__name__)

        handles.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        m(*example_inputs)
    for h in handles:
        h.remove()
    rows = []
    for name, mod in m.named_modules():
        own = [(pn, list(p.shape)) for pn, p in mod.named_parameters(recurse=False)]
        own_b = [(bn, list(b.shape)) for bn, b in mod.named_buffers(recurse=False)]
        rows.append(
            dict(
                name=name or "(root)",
                type=type(mod).__name__,
                args=mod.extra_repr(),
                params=own,
                buffers=own_b,
                n_params_own=sum(int(np.prod(s)) for _, s in own),
                n_params_total=sum(p.numel() for p in mod.parameters()),
                out_shape=shapes.get(name),
            )
        )
    return rows


# ----------------------------------------------------------------------------- stage scripts


STAGE1_SELECTORS = [
    ("make_opt", starts("opt, lr_sched = doy.LRScheduler.make(")),
    ("train_step", is_func("train_step")),
]

STAGE2_SELECTORS = [
    ("make_opt", starts("opt, lr_sched = doy.LRScheduler.make(")),
    ("train_loop", lambda node, seg: isinstance(node, ast.For)),
]

STAGE3_SELECTORS = [
    ("create_policy", starts("policy = utils.create_policy(")),
    ("decoder", starts("policy.decoder = create_decoder(")),
    ("idm_eval", starts("idm.eval()")),
    ("sl_head_alias", starts("policy.policy_head_sl = policy.policy_head")),
    ("rl_head", starts("policy.policy_head_rl = nn.Linear(")),
    ("rl_head_zero", starts("with torch.no_grad():")),
    ("fc_rl_alias", starts("policy.fc_rl = policy.fc")),
    ("fc_sl", starts("policy.fc_sl = nn.Sequential(")),
    ("fc_sl_load", starts("policy.fc_sl[0].load_state_dict(")),
    ("freeze_sl", starts("for param in chain(")),
    ("get_value_def", is_func("get_value")),
    ("get_value_patch", starts("policy.get_value = partial(")),
    ("lr", starts("_lr = cfg.stage3.lr")),
    ("make_opt", starts("opt, lr_sched = doy.LRScheduler.make(")),
    ("buf_obs", starts("buf_obs = deque(")),
    ("buf_la", starts("buf_la = []")),
    ("buf_ta", starts("buf_ta = []")),
    ("action_selection_hook", is_func("action_selection_hook")),
    ("reset_decoder", is_func("reset_decoder")),
    ("post_update_hook", is_func("post_update_hook")),
]


def run_stage1_step(cfg, idm0, wm0, obs, selected, n_steps=1):
    """`n_steps` optimiser steps exactly as stage1_idm.py's train_step() at steps 0..n_steps-1
    (every step sees the same 4 windows)."""
    picked = pick_statements("stage1_idm.py", STAGE1_SELECTORS)
    idm = copy.deepcopy(idm0)
    wm = copy.deepcopy(wm0)
    batches = [TensorDict(dict(obs=obs.clone()), batch_size=len(obs)) for _ in range(n_steps)]
    logged = {}

    def logger(step, **kw):
        logged.update(kw)
        logged["step"] = step

    # pre-clip gradients (post-accumulate hooks fire at the end of backward, before clip_grad_norm_)
    pre_clip = {}
    handles = []
    for prefix, model in (("idm", idm), ("wm", wm)):
        for k, p in model.named_parameters():
            key = f"{prefix}.{k}"
            if selected is None or k in selected[prefix]:
                handles.append(
                    p.register_post_accumulate_grad_hook(
                        lambda param, key=key: pre_clip.__setitem__(key, param.grad.detach().clone())
                    )
                )
    ns = dict(
        __name__="lapo_stage1_fixture",
        doy=doy,
        torch=torch,
        cfg=cfg,
        idm=idm,
        wm=wm,
        train_iter=iter(batches),
        step=0,
        logger=logger,
    )
    exec_nodes("stage1_idm.py", [p[1] for p in picked], ns)
    opt = ns["opt"]
    out = OrderedDict()
    out["input/obs"] = to_np(obs)
    max_norm = 2.0  # stage1_idm.py: clip_grad_norm_([...], 2)
    steps_meta = []
    for i in range(n_steps):
        ns["step"] = i
        logged.clear()
        ns["train_step"]()
        pfx = "output/" if n_steps == 1 else f"output/step{i}/"
        batch = batches[i]
        out[pfx + "loss"] = to_np(logged["wm_loss"] + logged["vq_loss"])  # train_step: loss = wm_loss + vq_loss
        out[pfx + "wm_loss"] = to_np(logged["wm_loss"])
        out[pfx + "vq_loss"] = to_np(logged["vq_loss"])
        out[pfx + "vq_perp"] = to_np(logged["vq_perp"])
        out[pfx + "grad_norm"] = to_np(logged["grad_norm"])  # clip_grad_norm_ return: total 2-norm before clipping
        out[pfx + "lr"] = np.asarray(logged["lr_all"], dtype=np.float64)
        clip_coef = min(1.0, max_norm / (float(logged["grad_norm"]) + 1e-6))
        out[pfx + "clip_coef"] = np.asarray(clip_coef, dtype=np.float64)
        for k in ("la", "la_q", "la_qinds", "wm_pred"):
            out[pfx + f"batch/{k}"] = to_np(batch[k])
        if n_steps > 1:
            for key, g in pre_clip.items():
                out[pfx + f"grad_pre_clip/{key}"] = to_np(g)
        steps_meta.append(
            dict(
                step=i,
                lr=float(logged["lr_all"]),
                loss=float(out[pfx + "loss"]),
                wm_loss=float(logged["wm_loss"]),
                vq_loss=float(logged["vq_loss"]),
                vq_perp=float(logged["vq_perp"]),
                grad_norm=float(logged["grad_norm"]),
                clip_coef=clip_coef,
            )
        )
    for h in handles:
        h.remove()
    for prefix, model in (("idm", idm), ("wm", wm)):
        for k, p in model.named_parameters():
            if selected is None or k in selected[prefix]:
                out[f"output/param_after/{prefix}.{k}"] = to_np(p)
                if n_steps == 1:
                    out[f"output/grad_pre_clip/{prefix}.{k}"] = to_np(pre_clip[f"{prefix}.{k}"])
                    out[f"output/grad_post_clip/{prefix}.{k}"] = to_np(p.grad)
        for k, b in model.named_buffers():
            out[f"output/buffer_after/{prefix}.{k}"] = to_np(b)
    opt_info = dict(
        type=type(opt).__name__,
        groups=[
            {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in g.items() if k != "params"}
            | {"n_params": sum(p.numel() for p in g["params"]), "n_tensors": len(g["params"])}
            for g in opt.param_groups
        ],
        param_order="[*wm.parameters(), *idm.parameters()] (doy.LRScheduler.make(all=(schedule, [wm, idm])))",
    )
    meta = dict(
        lines={p[0]: p[2] for p in picked},
        first_lines={p[0]: p[3] for p in picked},
        opt=opt_info,
        steps=steps_meta,
    )
    return out, meta


def run_stage2_step(cfg, policy0, idm0, obs, selected):
    """One BC step exactly as the body of stage2_bc.py's training loop at step 0."""
    picked = pick_statements("stage2_bc.py", STAGE2_SELECTORS)
    opt_node = picked[0][1]
    loop_node = picked[1][1]
    body = loop_node.body[:9]
    body_src = [ast.unparse(n) for n in body]
    assert body_src[0] == "lr_sched.step(step)" and body_src[-1] == "opt.step()", body_src
    policy = copy.deepcopy(policy0)
    idm = copy.deepcopy(idm0)
    idm.eval()  # stage2_bc.py line 22
    batch = TensorDict(dict(obs=obs.clone()), batch_size=len(obs))
    ns = dict(
        __name__="lapo_stage2_fixture",
        doy=doy,
        torch=torch,
        F=F,
        cfg=cfg,
        policy=policy,
        idm=idm,
        train_iter=iter([batch]),
        step=0,
    )
    exec_nodes("stage2_bc.py", [opt_node] + body, ns)
    out = OrderedDict()
    out["input/obs"] = to_np(obs)
    out["output/la_target"] = to_np(batch["la"])
    out["output/preds"] = to_np(ns["preds"])
    out["output/loss"] = to_np(ns["loss"])
    out["output/lr"] = np.asarray(ns["lr_sched"].get_state()["lr_policy"], dtype=np.float64)
    for k, p in policy.named_parameters():
        if selected is None or k in selected:
            out[f"output/param_after/{k}"] = to_np(p)
            if p.grad is not None:
                out[f"output/grad/{k}"] = to_np(p.grad)
    meta = dict(
        lines=dict(make_opt=picked[0][2], loop_body=(body[0].lineno, body[-1].end_lineno)),
        body=body_src,
        loss=float(out["output/loss"]),
        lr=float(out["output/lr"]),
    )
    return out, meta


def build_stage3_policy(cfg, policy0, idm0):
    """Run the stage3_decoding.py statements that turn the latent policy into the RL policy."""
    picked = pick_statements("stage3_decoding.py", STAGE3_SELECTORS)
    idm = copy.deepcopy(idm0)
    ns = dict(
        __name__="lapo_stage3_fixture",
        config=config,
        doy=doy,
        torch=torch,
        nn=nn,
        F=F,
        utils=utils,
        cfg=cfg,
        chain=chain,
        partial=partial,
        deque=deque,
        Categorical=Categorical,
        DataLoader=DataLoader,
        TensorDataset=TensorDataset,
        create_decoder=utils.create_decoder,
        PLS=PLS,
        idm=idm,
        # stage3 loads state_dict = torch.load(latent_policy.pt); here: the (untrained) latent policy
        state_dict=dict(policy=copy.deepcopy(policy0.state_dict())),
    )
    exec_nodes("stage3_decoding.py", [p[1] for p in picked], ns)
    return ns, picked


def run_stage3_ppo_updates(ns, obs, actions, la, updates: int = 2, at_step: int = 60_000) -> dict:
    """Two of the reference's own PPO updates (ppo.batch_update, one minibatch each) of the stage-3
    policy, after one online-decoder step on the live decoder, as stage3_decoding.py runs them: its
    optimiser (lr schedule at env step `at_step`, where every ramp is open), its action-selection
    hook, its clip over all of policy.parameters() (the trunk's and decoder's gradients, outside the
    optimiser, are never cleared). Records the norm each clip saw, the trained layers after each
    update, and the trunk's and decoder's gradients at the end."""
    import ppo  # reference

    policy, opt = ns["policy"], ns["opt"]
    ns["lr_sched"].step(at_step)
    out = OrderedDict()
    for g, name in zip(opt.param_groups, ("policy_head", "value_head", "linear_layer")):
        out[f"output/ppo/lr/{name}"] = np.array(g["lr"], np.float64)
    # post_update_hook's decoder step, on the live decoder (its gradients stay for PPO's clip)
    dec_opt = torch.optim.Adam(policy.decoder.parameters())
    dec_opt.zero_grad()
    F.cross_entropy(policy.decoder(la), actions.long(), label_smoothing=0.05).backward()
    dec_opt.step()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        _, logprobs, _, values = ns["action_selection_hook"](obs, action=actions)
    batch = TensorDict(dict(obs=obs, actions=actions, logprobs=logprobs, values=values.flatten(),
                            adv=torch.randn(len(obs), generator=gen),
                            returns=values.flatten() + torch.randn(len(obs), generator=gen)), batch_size=[len(obs)])
    for k in ("adv", "returns", "logprobs", "values"):
        out[f"input/ppo/{k}"] = to_np(batch[k])
    raw = torch.round((obs + 0.5) * 255).to(torch.uint8)  # ppo.batch_update normalises the frames itself
    assert torch.equal(data_loader.normalize_obs(raw), obs)
    out["input/ppo/obs_u8"] = to_np(raw)
    norms = []
    real_clip = nn.utils.clip_grad_norm_

    def recording_clip(params, max_norm, *a, **k):
        norm = real_clip(params, max_norm, *a, **k)
        norms.append(norm.detach().clone())
        return norm

    nn.utils.clip_grad_norm_ = recording_clip
    try:
        for u in range(updates):
            ppo.batch_update(policy, opt, batch.clone().set("obs", raw), ns["cfg"].stage3, ns["action_selection_hook"])
            for mod in ("policy_head_rl", "value_head", "fc_rl"):
                for k, v in getattr(policy, mod).named_parameters():
                    out[f"output/ppo/update{u}/param_after/{mod}.{k}"] = to_np(v)
    finally:
        nn.utils.clip_grad_norm_ = real_clip
    out["output/ppo/clip_total_norm"] = to_np(torch.stack(norms))
    for mod in ("conv_stack", "decoder"):
        for k, v in getattr(policy, mod).named_parameters():
            out[f"output/ppo/grad_after/{mod}.{k}"] = to_np(v.grad)
    return out


# ----------------------------------------------------------------------------- training trajectories
# Several steps of each stage's training on distinct batches, with what makes each term of the maths
# observable: every loss term, every step's gradients, Adam's state at the end, the lr schedule at
# many steps, and starting weights under which each gradient clip fires (the reference's initial
# gradients are far below its clips: stage 1's norm is 0.2-0.4 against a clip of 2).

TRAIN_STEPS = 5
# The steps' index in the schedule: past the warm-ups, at the peak lr, where AdamW's weight decay
# (lr x 1e-2 x p per step) is ~100 float32 ulps of p over the steps, and so observable.
TRAIN_FROM = dict(stage1=1_000, stage2=1_500)
# PPO's per-update gradients of the 2048x256 fc are left out of the small files (its lr is 0 at
# PPO_AT_STEP; its Adam state is kept)
BIG = ("fc_rl.weight",)
TRAIN_BATCH = 8
STAGE1_CLIP_SCALE = 30.0  # the FDM's last conv x this: stage 1's gradient norm rises above its clip of 2
STAGE2_TARGET_SCALE = 30.0  # the IDM's head x this: stage 2's targets (and gradients) larger than at init
PPO_BATCH = 32
PPO_UPDATES = 4
PPO_AT_STEP = 11 * 4_096  # an update's env step (64 envs x 64): the action head's lr (2/3 of its ramp) differs from the value head's (4/5)
STAGE1_LR_AT = [0, 1, 25, 49, 50, 51, 1_000, 25_000, 49_999, 50_000, 50_001]
STAGE2_LR_AT = [0, 1, 500, 999, 1_000, 1_001, 30_000, 59_999, 60_000, 60_001]
STAGE3_LR_AT = [u * 4_096 for u in (0, 1, 6, 7, 8, 9, 11, 12, 13, 15, 25, 48, 49, 50, 488, 975, 976)]


def train_windows(data, step: int, n: int = TRAIN_BATCH):
    """Windows (B, 3, C, H, W) uint8 of 3 consecutive frames inside one episode, a different set per
    step (drawn from the recorded frames), and the action taken at each window's middle frame."""
    frames, firsts, actions = data["all_frames_hwc"], data["firsts"], data["all_actions"]
    ok = [(b, t) for t in range(frames.shape[1] - 2) for b in range(frames.shape[0])
          if not firsts[b, t + 1] and not firsts[b, t + 2]]
    rng = np.random.default_rng(1_000 + step)
    pick = [ok[i] for i in rng.choice(len(ok), n, replace=False)]
    win = np.stack([frames[b, t:t + 3] for b, t in pick])  # (n, 3, H, W, C)
    return torch.from_numpy(win).permute(0, 1, 4, 2, 3).contiguous(), torch.tensor([actions[t + 1, b] for b, t in pick])


def adam_state(opt, named: dict, selected) -> dict:
    """exp_avg / exp_avg_sq / step of each (selected) parameter, by name."""
    out = OrderedDict()
    for k, p in named.items():
        if selected is not None and k not in selected:
            continue
        st = opt.state.get(p, {})
        for field in ("exp_avg", "exp_avg_sq"):
            if field in st:
                out[f"output/adam/{field}/{k}"] = to_np(st[field])
        if "step" in st:
            out[f"output/adam/step/{k}"] = np.asarray(float(st["step"]), np.float64)
    return out


def lr_table(make_sched, at: list) -> dict:
    """The reference schedule's lr of each group at each step of `at` (a fresh optimiser)."""
    opt, sched = make_sched()
    rows = []
    for s in at:
        sched.step(s)
        rows.append([g["lr"] for g in opt.param_groups])
    return {"output/schedule/at": np.asarray(at, np.int64), "output/schedule/lr": np.asarray(rows, np.float64)}


def run_stage1_train(cfg, idm0, wm0, data, selected) -> dict:
    """TRAIN_STEPS of stage1_idm.py's train_step from step TRAIN_FROM, each on its own windows, from the
    reference's weights with the FDM's last conv scaled (the clip fires)."""
    picked = pick_statements("stage1_idm.py", STAGE1_SELECTORS)
    idm, wm = copy.deepcopy(idm0), copy.deepcopy(wm0)
    with torch.no_grad():
        wm.final_conv[-1].weight.mul_(STAGE1_CLIP_SCALE)
    out = OrderedDict((k.replace("param/", "param/idm.", 1).replace("buffer/", "buffer/idm.", 1), v)
                      for k, v in state_arrays(idm).items())
    out.update((k.replace("param/", "param/wm.", 1).replace("buffer/", "buffer/wm.", 1), v)
               for k, v in state_arrays(wm).items())
    batches = [train_windows(data, i)[0] for i in range(TRAIN_STEPS)]
    tds = [TensorDict(dict(obs=data_loader.normalize_obs(b)), batch_size=len(b)) for b in batches]
    logged = {}
    named = {f"idm.{k}": p for k, p in idm.named_parameters()} | {f"wm.{k}": p for k, p in wm.named_parameters()}
    keep = None if selected is None else {f"{m}.{k}" for m, ks in selected.items() for k in ks}
    grads = {}
    # every gradient, at both sizes (170 MB at the paper size): check-reference replays them through
    # its optimiser and forces its own steps onto that trajectory, which a selection cannot do
    for k, p in named.items():
        p.register_post_accumulate_grad_hook(lambda param, k=k: grads.__setitem__(k, param.grad.detach().clone()))
    ns = dict(__name__="lapo_stage1_fixture", doy=doy, torch=torch, cfg=cfg, idm=idm, wm=wm, train_iter=iter(tds),
              step=0, logger=lambda step, **kw: logged.update(kw))
    exec_nodes("stage1_idm.py", [p[1] for p in picked], ns)
    out["input/start_step"] = np.asarray(TRAIN_FROM["stage1"], np.int64)
    for i in range(TRAIN_STEPS):
        ns["step"] = TRAIN_FROM["stage1"] + i
        out[f"input/step{i}/obs_uint8"] = to_np(batches[i])
        ns["train_step"]()
        for k in ("wm_loss", "vq_loss", "vq_perp", "grad_norm"):
            out[f"output/step{i}/{k}"] = to_np(logged[k])
        out[f"output/step{i}/lr"] = np.asarray(logged["lr_all"], np.float64)
        out[f"output/step{i}/la_qinds"] = to_np(tds[i]["la_qinds"])
        for k, g in grads.items():
            out[f"output/step{i}/grad_pre_clip/{k}"] = to_np(g)
        grads.clear()
    for k, p in named.items():
        if keep is None or k in keep:
            out[f"output/param_after/{k}"] = to_np(p)
    for prefix, model in (("idm", idm), ("wm", wm)):
        for k, b in model.named_buffers():
            out[f"output/buffer_after/{prefix}.{k}"] = to_np(b)
    out.update(adam_state(ns["opt"], named, keep))

    def fresh():
        n2 = dict(doy=doy, cfg=cfg, idm=copy.deepcopy(idm0), wm=copy.deepcopy(wm0))
        exec_nodes("stage1_idm.py", [picked[0][1]], n2)
        return n2["opt"], n2["lr_sched"]

    out.update(lr_table(fresh, STAGE1_LR_AT))
    return out


def run_stage2_train(cfg, policy0, idm0, data, selected) -> dict:
    """TRAIN_STEPS of stage2_bc.py's loop body from step TRAIN_FROM, each on its own windows; the IDM's head
    scaled (larger targets: the gradient norms exceed any clip a mutant could add)."""
    picked = pick_statements("stage2_bc.py", STAGE2_SELECTORS)
    body = picked[1][1].body[:9]
    policy, idm = copy.deepcopy(policy0), copy.deepcopy(idm0)
    with torch.no_grad():
        idm.policy_head.weight.mul_(STAGE2_TARGET_SCALE)
        idm.policy_head.bias.mul_(STAGE2_TARGET_SCALE)
    idm.eval()
    out = OrderedDict((k.replace("param/", "param/policy.", 1).replace("buffer/", "buffer/policy.", 1), v)
                      for k, v in state_arrays(policy).items())
    out.update((k.replace("param/", "param/idm.", 1).replace("buffer/", "buffer/idm.", 1), v)
               for k, v in state_arrays(idm).items())
    batches = [train_windows(data, 100 + i)[0] for i in range(TRAIN_STEPS)]
    tds = [TensorDict(dict(obs=data_loader.normalize_obs(b)), batch_size=len(b)) for b in batches]
    named = dict(policy.named_parameters())
    ns = dict(__name__="lapo_stage2_fixture", doy=doy, torch=torch, F=F, cfg=cfg, policy=policy, idm=idm,
              train_iter=iter(tds), step=0)
    exec_nodes("stage2_bc.py", [picked[0][1]], ns)
    out["input/start_step"] = np.asarray(TRAIN_FROM["stage2"], np.int64)
    for i in range(TRAIN_STEPS):
        ns["step"] = TRAIN_FROM["stage2"] + i
        out[f"input/step{i}/obs_uint8"] = to_np(batches[i])
        exec_nodes("stage2_bc.py", body, ns)
        out[f"output/step{i}/la_target"] = to_np(tds[i]["la"])
        out[f"output/step{i}/loss"] = to_np(ns["loss"])
        out[f"output/step{i}/lr"] = np.asarray(ns["lr_sched"].get_state()["lr_policy"], np.float64)
        for k, p in named.items():
            if p.grad is not None and (selected is None or k in selected):
                out[f"output/step{i}/grad/{k}"] = to_np(p.grad)
    for k, p in named.items():
        if selected is None or k in selected:
            out[f"output/param_after/{k}"] = to_np(p)
    out.update(adam_state(ns["opt"], named, selected))

    def fresh():
        n2 = dict(doy=doy, cfg=cfg, policy=copy.deepcopy(policy0))
        exec_nodes("stage2_bc.py", [picked[0][1]], n2)
        return n2["opt"], n2["lr_sched"]

    out.update(lr_table(fresh, STAGE2_LR_AT))
    return out


class _RecordingDataset(TensorDataset):
    """TensorDataset that records the order its items are read in (the DataLoader's shuffle)."""

    order: list = []

    def __getitem__(self, i):
        _RecordingDataset.order.append(int(i))
        return super().__getitem__(i)

    def __getitems__(self, idxs):
        return [self[i] for i in idxs]


def run_stage3_train(cfg, policy0, idm0, data) -> dict:
    """Stage 3b's maths beyond one step: post_update_hook's whole decoder retraining (reset, Adam,
    512-batches, 3 epochs, label smoothing) on 1,100 labelled latents, with the shuffle order and the
    reset weights recorded; PPO_UPDATES of ppo.batch_update on PPO_BATCH observations at env step
    PPO_AT_STEP, with the old log-probs and values perturbed (the ratio and value clips fire), every
    loss term, the trained heads' gradients before the clip and Adam's state; the lr schedules; and
    ppo._bootstrap's GAE on a made-up rollout with episode ends."""
    import ppo  # reference

    ns, _ = build_stage3_policy(cfg, policy0, idm0)
    policy, opt = ns["policy"], ns["opt"]
    out = OrderedDict()
    gen = torch.Generator().manual_seed(SEED + 7)
    # -- the decoder's retraining
    la = torch.randn(11 * 100, cfg.model.la_dim, generator=gen)
    ta = torch.randint(0, cfg.model.ta_dim, (13, 100), generator=gen)
    ns["buf_la"][:] = list(la.split(100))
    ns["buf_ta"][:] = list(ta)
    reset_weights = {}
    original_reset = ns["reset_decoder"]

    def recording_reset(decoder):
        original_reset(decoder)
        reset_weights.update({k: to_np(v) for k, v in decoder.state_dict().items()})

    ns["reset_decoder"] = recording_reset
    ns["TensorDataset"] = _RecordingDataset
    _RecordingDataset.order = []
    losses = []
    real_ce = F.cross_entropy
    ns["F"] = type("F", (), {"cross_entropy": staticmethod(lambda *a, **k: losses.append(real_ce(*a, **k)) or losses[-1]),
                             "relu": F.relu})
    torch.manual_seed(SEED + 11)
    ns["post_update_hook"](1, 20_000)
    ns["F"] = F
    out["input/decoder/latents"] = to_np(torch.stack(ns["buf_la"]).flatten(0, 1))
    out["input/decoder/actions"] = to_np(torch.stack(ns["buf_ta"])[1:-1].flatten(0, 1))
    out["input/decoder/order"] = np.asarray(_RecordingDataset.order, np.int64)
    for k, v in reset_weights.items():
        out[f"input/decoder/reset/{k}"] = v
    out["output/decoder/losses"] = to_np(torch.stack([x.detach() for x in losses]))
    for k, v in policy.decoder.state_dict().items():
        out[f"output/decoder/param_after/{k}"] = to_np(v)
    # -- PPO updates, from the policy as the decoder's retraining left it
    out.update(state_arrays(policy))
    out.update(lr_table(lambda: (opt, ns["lr_sched"]), STAGE3_LR_AT))
    ns["lr_sched"].step(PPO_AT_STEP)
    for g, name in zip(opt.param_groups, ("policy_head", "value_head", "linear_layer")):
        out[f"output/ppo/lr/{name}"] = np.array(g["lr"], np.float64)
    raw, actions = train_windows(data, 200, PPO_BATCH)
    raw, actions = raw[:, 1].contiguous(), actions
    obs = data_loader.normalize_obs(raw)
    with torch.no_grad():
        _, logprobs, _, values = ns["action_selection_hook"](obs, action=actions)
    batch = TensorDict(dict(obs=raw, actions=actions, logprobs=logprobs + 0.3 * torch.randn(PPO_BATCH, generator=gen),
                            values=values.flatten() + 0.3 * torch.randn(PPO_BATCH, generator=gen),
                            adv=torch.randn(PPO_BATCH, generator=gen) + 0.5,
                            returns=values.flatten() + torch.randn(PPO_BATCH, generator=gen)), batch_size=[PPO_BATCH])
    out["input/ppo/obs_u8"] = to_np(raw)
    out["input/ppo/actions"] = to_np(actions)
    for k in ("adv", "returns", "logprobs", "values"):
        out[f"input/ppo/{k}"] = to_np(batch[k])
    heads = {f"{m}.{k}": p for m in ("policy_head_rl", "value_head", "fc_rl") for k, p in getattr(policy, m).named_parameters()}
    grads = {}
    for k, p in heads.items():
        p.register_post_accumulate_grad_hook(lambda param, k=k: grads.__setitem__(k, param.grad.detach().clone()))
    norms, real_clip = [], nn.utils.clip_grad_norm_

    def recording_clip(params, max_norm, *a, **k):
        norms.append(real_clip(params, max_norm, *a, **k).detach().clone())
        return norms[-1]

    nn.utils.clip_grad_norm_ = recording_clip
    try:
        for u in range(PPO_UPDATES):
            terms = ppo.batch_update(policy, opt, batch.clone(), ns["cfg"].stage3, ns["action_selection_hook"])
            for name, v in zip(("approx_kl", "clipfrac", "pg_loss", "v_loss", "entropy"), terms):
                out[f"output/ppo/update{u}/{name}"] = np.asarray(float(v), np.float64)
            for k, g in grads.items():
                if k not in BIG:
                    out[f"output/ppo/update{u}/grad_pre_clip/{k}"] = to_np(g)
            grads.clear()
    finally:
        nn.utils.clip_grad_norm_ = real_clip
    out["output/ppo/clip_total_norm"] = to_np(torch.stack(norms))
    for k, p in heads.items():
        out[f"output/ppo/param_after/{k}"] = to_np(p)
    out.update({k.replace("output/adam/", "output/ppo/adam/"): v for k, v in adam_state(opt, heads, None).items()})
    # -- GAE
    T, N = 16, 4
    rewards = torch.randn(T, N, generator=gen)
    dones = (torch.rand(T, N, generator=gen) < 0.15).float()
    values_r = torch.randn(T, N, generator=gen)
    next_value, next_done = torch.randn(N, generator=gen), (torch.rand(N, generator=gen) < 0.3).float()
    buf = TensorDict(dict(rewards=rewards, dones=dones, values=values_r), batch_size=T)
    stub = type("Stub", (), {"get_value": lambda self, x: next_value})()
    s3 = ns["cfg"].stage3
    ppo._bootstrap(stub, buf, torch.zeros(N, dtype=torch.uint8), next_done, SimpleNamespace(num_steps=T, gamma=s3.gamma,
                                                                         gae_lambda=s3.gae_lambda))
    for k, v in (("rewards", rewards), ("dones", dones), ("values", values_r), ("next_value", next_value),
                 ("next_done", next_done)):
        out[f"input/gae/{k}"] = to_np(v)
    out["output/gae/adv"], out["output/gae/returns"] = to_np(buf["adv"]), to_np(buf["returns"])
    # -- the update count: ppo.train's own statement, on stage 3's settings
    train_src = ast.parse(inspect.getsource(ppo.train))
    stmt = next(n for n in ast.walk(train_src) if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "num_updates")
    out["output/ppo/num_updates"] = np.asarray(eval(ast.unparse(stmt.value), {"rl_cfg": s3}), np.int64)
    out["output/ppo/env_steps"] = np.asarray(s3.steps, np.int64)
    # -- rewards as setup_procgen_env scales them (NormalizeReward, then the clip), on made-up rewards
    out.update(reward_scaling(s3.gamma, gen))
    # -- the online decoder's labels over two rollouts, as the action-selection hook collects them
    out.update(online_labels(cfg, policy0, idm0, data))
    return out


def reward_scaling(gamma: float, gen) -> dict:
    """env_utils.setup_procgen_env's reward wrappers (gym's NormalizeReward at the stage's gamma and
    TransformReward's clip to +-10, its own lambda) around a stub vector env replaying rewards and
    dones: small rewards, episode ends, and a large one late, which the clip cuts."""
    import env_utils  # reference
    import gym

    T, N = 48, 4
    rewards = (torch.rand(T, N, generator=gen) < 0.3).double() * 0.1
    rewards[40, 1], rewards[41, 2] = 50.0, -30.0
    dones = torch.rand(T, N, generator=gen) < 0.05

    class Stub(gym.Env):
        observation_space = gym.spaces.Box(0, 1, (1,))
        action_space = gym.spaces.Discrete(2)
        num_envs, is_vector_env, t = N, True, 0

        def step(self, action):
            self.t += 1
            return np.zeros((N, 1)), rewards[self.t - 1].numpy(), dones[self.t - 1].numpy(), [{}] * N

        def reset(self, **kw):
            return np.zeros((N, 1))

    src = inspect.getsource(env_utils.setup_procgen_env)
    assert "gym.wrappers.NormalizeReward(envs, gamma=gamma)" in src and "np.clip(reward, -10, 10)" in src
    envs = gym.wrappers.NormalizeReward(Stub(), gamma=gamma)
    envs = gym.wrappers.TransformReward(envs, lambda reward: np.clip(reward, -10, 10))
    scaled = np.stack([envs.step(np.zeros(N, np.int64))[1] for _ in range(T)])
    assert (np.abs(scaled) == 10).any(), "the clip never fired: change the made-up rewards"
    return {"input/rewards/rewards": rewards.numpy(), "input/rewards/dones": dones.numpy(),
            "output/rewards/scaled": scaled.astype(np.float64)}


def online_labels(cfg, policy0, idm0, data) -> dict:
    """stage3_decoding.py's action-selection hook over two rollouts of 16 steps of recorded frames
    (no episode ends): the actions it samples, and the (latent, action) pairs post_update_hook then
    trains its decoder on (every transition but the first and the last seen)."""
    ns, _ = build_stage3_policy(cfg, policy0, idm0)
    T = 16
    envs = [b for b in range(BATCH) if not data["firsts"][b, 1:2 * T + 1].any()]  # no episode end inside
    assert envs, "every env's episode ends inside the labelled frames: another --procgen-seed"
    frames = data["all_frames_hwc"][envs, :2 * T + 1]  # (N, 2T+1, H, W, C)
    torch.manual_seed(SEED + 13)
    actions = []
    with torch.no_grad():
        for t in range(2 * T):
            obs = data_loader.normalize_obs(torch.from_numpy(frames[:, t]).permute(0, 3, 1, 2).contiguous())
            actions.append(ns["action_selection_hook"](obs, global_step=t)[0])
    out = OrderedDict((f"input/labels/idm/{k}", v) for k, v in
                      ((k, to_np(v)) for k, v in ns["idm"].state_dict().items()))
    out["input/labels/frames"] = np.ascontiguousarray(frames)
    out["input/labels/actions"] = to_np(torch.stack(actions))  # (2T, N)
    seen = []

    class Seen(TensorDataset):  # what post_update_hook builds its decoder's dataset from
        def __init__(self, *tensors):
            seen.extend(tensors)
            super().__init__(*tensors)

    ns["TensorDataset"] = Seen
    ns["post_update_hook"](1, 20_000)
    out["output/labels/train_la"], out["output/labels/train_ta"] = to_np(seen[0]), to_np(seen[1])
    return out


# ----------------------------------------------------------------------------- main


def save_npz(path: Path, arrays: dict, manifest: dict):
    for k, v in arrays.items():
        assert isinstance(v, np.ndarray), k
        assert v.dtype in (np.float32, np.float64, np.int64, np.uint8, np.bool_), (k, v.dtype)
        assert k.split("/")[0] in ("param", "buffer", "input", "output"), k
    np.savez_compressed(path, **arrays)
    manifest[path.name] = OrderedDict(
        (k, dict(shape=list(v.shape), dtype=str(v.dtype), sha256=sha(v))) for k, v in arrays.items()
    )
    return path.stat().st_size


def _cpu_flags() -> str:
    """The vector instruction sets of this CPU (from /proc/cpuinfo, Linux)."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    return " ".join(sorted(f for f in flags if f.startswith(("avx", "sse4", "fma", "amx"))))


def _other_versions():
    import importlib.metadata as md

    names = ["omegaconf", "gym", "procgen-mirror", "gym3", "funcy"]
    return ", ".join(f"{n} {md.version(n)}" for n in names)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(HERE / "fixtures"))
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (fixtures: 1)")
    ap.add_argument("--no-readme", action="store_true")
    ap.add_argument("--seed", type=int, default=None, help="model seed (default 0)")
    ap.add_argument("--procgen-seed", type=int, default=None, help="procgen rand_seed for the frames")
    args = ap.parse_args()
    global SEED, PROCGEN_SEED
    if args.seed is not None:
        SEED = args.seed
    if args.procgen_seed is not None:
        PROCGEN_SEED = args.procgen_seed
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    manifest = OrderedDict()
    info = OrderedDict()
    commit = subprocess.run(
        ["git", "--git-dir=" + os.environ.get("LAPO_GIT", ""), "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    import procgen  # noqa: F401
    import tensordict

    info["env"] = dict(
        reference_commit=commit or "c3844f7e8c92e900bf7547a265f14089ac68b121",
        torch=torch.__version__,
        numpy=np.__version__,
        tensordict=tensordict.__version__,
        doy=getattr(doy, "__version__", "1.9.2"),
        python=platform.python_version(),
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        num_threads=torch.get_num_threads(),
        deterministic=torch.are_deterministic_algorithms_enabled(),
        seed=SEED,
        procgen_seed=PROCGEN_SEED,
        warmup_steps=WARMUP_STEPS,
        others=_other_versions(),
    )

    # What the fixtures' round-off depends on: the torch build and the CPU kernels it picked.
    made_by = dict(torch=torch.__version__, cpu_capability=torch.backends.cpu.get_cpu_capability(),
                   cpu=platform.processor() or platform.machine(), cpu_flags=_cpu_flags(),
                   torch_config=torch.__config__.show())
    info["env"]["cpu_flags"] = made_by["cpu_flags"]

    # ---- data
    data = make_frames()
    obs = data["obs"]  # (4, 3, 3, 64, 64) float32 in [-0.5, 0.5]
    frame_arrays = OrderedDict(
        [
            ("input/obs_uint8", to_np(data["obs_uint8"])),
            ("input/obs", to_np(obs)),
            ("input/ta_window", to_np(data["ta_window"])),
            ("input/all_frames_hwc_uint8", data["all_frames_hwc"]),
            ("input/all_actions", data["all_actions"]),
            ("input/firsts", data["firsts"]),
        ]
    )
    sizes = OrderedDict()
    sizes["frames_starpilot.npz"] = save_npz(out_dir / "frames_starpilot.npz", frame_arrays, manifest)
    try:  # preview of the windows (rows: envs, columns: t), 3x nearest-neighbour upscale
        from PIL import Image

        w_ = frame_arrays["input/obs_uint8"]
        img = np.concatenate([np.concatenate([w_[b, t].transpose(1, 2, 0) for t in range(3)], 1) for b in range(BATCH)], 0)
        Image.fromarray(img).resize((img.shape[1] * 3, img.shape[0] * 3), Image.NEAREST).save(out_dir / "frames_preview.png")
    except ImportError:
        pass

    obs_policy = obs[:, -2].contiguous()  # stage 2/3 policy input: pre-transition frame (B, 3, 64, 64)
    ta = data["ta_window"][:, -2].contiguous()  # action taken at that frame (B,)

    for size in SIZES:
        cfg = make_cfg(size)
        sinfo = info.setdefault(size, OrderedDict())
        sinfo["cfg_model"] = dict(
            wm_scale=cfg.model.wm_scale,
            idm_impala_scale=cfg.model.idm_impala_scale,
            policy_impala_scale=cfg.model.policy_impala_scale,
            la_dim=cfg.model.la_dim,
            ta_dim=cfg.model.ta_dim,
            vq=dict(cfg.model.vq),
        )

        # ---------------- models (fixed seed per size; construction order is fixed)
        torch.manual_seed(SEED)
        idm0, wm0 = utils.create_dynamics_models(cfg.model)
        policy0 = utils.create_policy(cfg.model, cfg.model.la_dim)
        idm0.train()
        wm0.train()
        policy0.train()

        # ---------------- IDM
        arrays = state_arrays(idm0)
        arrays["input/obs_uint8"] = to_np(data["obs_uint8"])
        arrays["input/obs"] = to_np(obs)
        out_eval, td_eval, m_eval = idm_outputs(idm0, obs, "eval")
        out_train, td_train, _ = idm_outputs(idm0, obs, "train")
        for k in ("la", "la_q", "la_qinds"):
            assert torch.equal(td_eval[k], td_train[k].detach()), k  # quantised with the pre-update codebook
        for k, v in idm0.state_dict().items():  # eval mode leaves the VQ buffers untouched
            assert torch.equal(v, m_eval.state_dict()[k]), k
        arrays.update(out_eval)
        arrays.update(out_train)
        fname = f"idm_{size}.npz"
        sizes[fname] = save_npz(out_dir / fname, arrays, manifest)
        sinfo["idm"] = dict(
            n_params=n_params(idm0),
            n_buffer_elems=n_buffers(idm0),
            vq_loss_eval=float(out_eval["output/eval/vq_loss"]),
            vq_perp_eval=float(out_eval["output/eval/vq_perp"]),
            la_qinds_eval=out_eval["output/eval/la_qinds"].reshape(BATCH, -1).tolist(),
        )
        la_q = td_eval["la_q"].detach()
        la = td_eval["la"].detach()
        # documented layout: la_q[b, (n*D + d)*L + l] == embedding[n, la_qinds[b, n, l, 0], d]
        emb = idm0.vq.embedding
        Nc, _, Dd = emb.shape
        inds = td_eval["la_qinds"][..., 0]  # (B, N, L)
        recon = emb[torch.arange(Nc)[None, :, None], inds]  # (B, N, L, D)
        assert torch.equal(recon.permute(0, 1, 3, 2).reshape(BATCH, -1), la_q)
        sinfo["idm"]["min_vq_dist_margin"] = float(out_eval["output/derived/vq_dist_margin"].min())
        sinfo["idm"]["second_vq_dist_margin"] = float(np.sort(out_eval["output/derived/vq_dist_margin"].ravel())[1])
        # The smallest |value| entering the IDM's last ReLUs (the flattened conv features, the fc
        # output): below ~1e-6, another memory layout's round-off can flip its sign (a near-tie).
        pre_relu = [np.abs(out_eval[f"output/eval/act/{n}"]).ravel() for n in ("conv_stack.2", "fc")]
        sinfo["idm"]["min_pre_relu_margin"] = float(min(a.min() for a in pre_relu))

        # ---------------- FDM / world model
        arrays = state_arrays(wm0)
        arrays["input/obs"] = to_np(obs)
        arrays["input/state_seq"] = to_np(obs[:, :-1])
        arrays["input/action"] = to_np(la_q)
        arrays["input/target"] = to_np(obs[:, -1])
        arrays.update(wm_outputs(wm0, obs, la_q, "train"))
        arrays.update(wm_outputs(wm0, obs, la_q, "eval"))
        fname = f"fdm_{size}.npz"
        sizes[fname] = save_npz(out_dir / fname, arrays, manifest)
        sinfo["fdm"] = dict(
            n_params=n_params(wm0),
            n_buffer_elems=n_buffers(wm0),
            loss_train=float(arrays["output/train/loss"]),
            loss_eval=float(arrays["output/eval/loss"]),
            structure=structure_table(wm0, (obs[:, :-1], la_q)),
        )
        sinfo["idm"]["structure"] = structure_table(idm0, (obs,))

        # ---------------- stage-1 step
        selected = None if size == "small" else STAGE1_SELECTED
        arrays, meta = run_stage1_step(cfg, idm0, wm0, obs, selected)
        # the step's forward equals the separately stored train-mode outputs
        for k in ("la", "la_q", "la_qinds"):
            assert np.array_equal(arrays[f"output/batch/{k}"], out_train[f"output/train/{k}"]), k
        for k in ("embedding", "ema_count", "ema_weight"):
            assert np.array_equal(
                arrays[f"output/buffer_after/idm.vq.{k}"], out_train[f"output/train/buffer_after/vq.{k}"]
            ), k
        fname = f"stage1_step_{size}.npz"
        sizes[fname] = save_npz(out_dir / fname, arrays, manifest)
        step1_arrays = arrays
        if selected is None:
            gn = torch.linalg.vector_norm(
                torch.stack(
                    [
                        torch.linalg.vector_norm(torch.from_numpy(v))
                        for k, v in arrays.items()
                        if k.startswith("output/grad_pre_clip/")
                    ]
                )
            )
            meta["grad_norm_recomputed_from_pre_clip"] = float(gn)
        sinfo["stage1_step"] = meta
        if size == "small":
            arrays, meta = run_stage1_step(cfg, idm0, wm0, obs, None, n_steps=2)
            for k in ("loss", "grad_norm", "vq_perp"):
                assert np.array_equal(arrays[f"output/step0/{k}"], step1_arrays[f"output/{k}"]), k
            fname = f"stage1_2steps_{size}.npz"
            sizes[fname] = save_npz(out_dir / fname, arrays, manifest)
            sinfo["stage1_2steps"] = meta

        # ---------------- latent policy (stage 2)
        arrays = state_arrays(policy0)
        arrays["input/obs"] = to_np(obs_policy)
        arrays["input/la_target"] = to_np(la)
        pol = copy.deepcopy(policy0).eval()
        cap = Capture(pol, POLICY_ACT_NAMES)
        with torch.no_grad():
            latent = pol(obs_policy)  # Policy.forward -> policy_head(relu(fc(conv_stack(x))))
        acts = dict(cap.acts)
        cap.remove()
        with torch.no_grad():
            value = pol.get_value(obs_policy)
            _, lp, ent, value2 = pol.get_action_and_value(obs_policy, action=ta)  # logits over la_dim (unused in LAPO)
            latent_train = copy.deepcopy(policy0).train()(obs_policy)
        assert torch.equal(latent, latent_train)  # no BN/dropout: train == eval
        arrays["output/latent_action"] = to_np(latent)
        arrays["output/value"] = to_np(value)
        for k, v in acts.items():
            arrays["output/act/" + k] = to_np(v)
        arrays["output/stage2_loss"] = to_np(F.mse_loss(latent, la))  # stage2_bc.py: F.mse_loss(policy(obs[:, -2]), batch["la"])
        fname = f"policy_{size}.npz"
        sizes[fname] = save_npz(out_dir / fname, arrays, manifest)
        sinfo["policy"] = dict(
            n_params=n_params(policy0),
            stage2_loss=float(arrays["output/stage2_loss"]),
            structure=structure_table(policy0, (obs_policy,)),
        )

        # ---------------- stage-2 step
        sel2 = None if size == "small" else STAGE2_SELECTED
        arrays, meta = run_stage2_step(cfg, policy0, idm0, obs, sel2)
        assert np.array_equal(arrays["output/la_target"], to_np(la))
        fname = f"stage2_step_{size}.npz"
        sizes[fname] = save_npz(out_dir / fname, arrays, manifest)
        sinfo["stage2_step"] = meta

        # ---------------- stage-3 RL policy wrapper
        ns, picked3 = build_stage3_policy(cfg, policy0, idm0)
        p3 = ns["policy"]
        arrays = state_arrays(p3)
        arrays["input/obs"] = to_np(obs_policy)
        arrays["input/action"] = to_np(ta)
        cap = Capture(
            p3,
            ["conv_stack", "fc_rl", "fc_sl", "policy_head_rl", "policy_head_sl", "decoder", "value_head"],
        )
        with torch.no_grad():
            action, logprob, entropy, value = ns["action_selection_hook"](obs_policy, action=ta)
        acts = dict(cap.acts)
        cap.remove()
        assert torch.equal(action, ta)
        logits_rl = acts["policy_head_rl"]
        logits_sl = acts["decoder"]
        logits = (logits_rl + logits_sl) / 2  # stage3_decoding.py action_selection_hook
        assert torch.equal(Categorical(logits=logits).log_prob(ta), logprob)
        with torch.no_grad():
            value_gv = p3.get_value(obs_policy)
        assert torch.equal(value_gv, value)
        for k in ("conv_stack", "fc_rl", "fc_sl", "policy_head_sl", "value_head"):
            arrays["output/act/" + k] = to_np(acts[k])
        arrays["output/latent_action"] = to_np(acts["policy_head_sl"])
        arrays["output/logits_rl"] = to_np(logits_rl)
        arrays["output/logits_sl"] = to_np(logits_sl)
        arrays["output/logits"] = to_np(logits)
        arrays["output/log_softmax"] = to_np(Categorical(logits=logits).logits)
        arrays["output/logprob"] = to_np(logprob)
        arrays["output/entropy"] = to_np(entropy)
        arrays["output/value"] = to_np(value)
        # online decoder SL step (post_update_hook's inner loop, one fixed batch, no reset/shuffle)
        dec = copy.deepcopy(p3.decoder)
        dec_in = la.clone()
        dec_opt = torch.optim.Adam(dec.parameters())
        dec_opt.zero_grad()
        dec_out = dec(dec_in)
        dec_loss = F.cross_entropy(dec_out, ta.long(), label_smoothing=0.05)
        dec_loss.backward()
        dec_opt.step()
        arrays["input/decoder_la"] = to_np(dec_in)
        arrays["output/decoder_sl/outputs"] = to_np(dec_out)
        arrays["output/decoder_sl/loss"] = to_np(dec_loss)
        for k, p in dec.named_parameters():
            arrays[f"output/decoder_sl/param_after/decoder.{k}"] = to_np(p)
            arrays[f"output/decoder_sl/grad/decoder.{k}"] = to_np(p.grad)
        arrays.update(run_stage3_ppo_updates(ns, obs_policy, ta, la))
        fname = f"stage3_policy_{size}.npz"
        sizes[fname] = save_npz(out_dir / fname, arrays, manifest)
        rl_opt = ns["opt"]
        sinfo["stage3"] = dict(
            n_params_unique=n_params(p3),
            n_params_trainable=sum(p.numel() for p in p3.parameters() if p.requires_grad),
            n_decoder=n_params(p3.decoder),
            state_dict_keys=list(p3.state_dict().keys()),
            lines={p[0]: p[2] for p in picked3},
            rl_opt_groups=[
                dict(lr=float(g["lr"]), n_params=sum(p.numel() for p in g["params"])) for g in rl_opt.param_groups
            ],
            logprob=to_np(logprob).tolist(),
            entropy=to_np(entropy).tolist(),
            decoder_sl_loss=float(dec_loss),
        )

        # ---------------- training trajectories (stages 1, 2, 3b)
        for kind, arrays in (("stage1_train", run_stage1_train(cfg, idm0, wm0, data, selected)),
                             ("stage2_train", run_stage2_train(cfg, policy0, idm0, data, sel2)),
                             ("stage3_train", run_stage3_train(cfg, policy0, idm0, data))):
            arrays["input/made_by"] = np.frombuffer(json.dumps(made_by).encode(), np.uint8).copy()
            fname = f"{kind}_{size}.npz"
            sizes[fname] = save_npz(out_dir / fname, arrays, manifest)

        print(f"[{size}] idm={sinfo['idm']['n_params']:,} fdm={sinfo['fdm']['n_params']:,} "
              f"policy={sinfo['policy']['n_params']:,} stage3={sinfo['stage3']['n_params_unique']:,} "
              f"stage1 loss={sinfo['stage1_step']['steps'][0]['loss']:.6g} grad_norm={sinfo['stage1_step']['steps'][0]['grad_norm']:.6g}",
              flush=True)

    info["file_sizes"] = sizes
    info["source_lines"] = dict(
        models=dict(
            merge_TC_dims=src_lines(models.merge_TC_dims),
            ResidualLayer=src_lines(models.ResidualLayer),
            DownsampleBlock=src_lines(models.DownsampleBlock),
            UpsampleBlock=src_lines(models.UpsampleBlock),
            WorldModel=src_lines(models.WorldModel),
            WorldModel_forward=src_lines(models.WorldModel.forward),
            WorldModel_label=src_lines(models.WorldModel.label),
            layer_init=src_lines(models.layer_init),
            ImpalaResidualBlock=src_lines(models.ImpalaResidualBlock),
            ConvSequence=src_lines(models.ConvSequence),
            get_impala=src_lines(models.get_impala),
            Policy=src_lines(models.Policy),
            VQEmbeddingEMA=src_lines(models.VQEmbeddingEMA),
            VQEmbeddingEMA_forward_2d=src_lines(models.VQEmbeddingEMA.forward_2d),
            VQEmbeddingEMA_forward=src_lines(models.VQEmbeddingEMA.forward),
            IDM=src_lines(models.IDM),
            IDM_forward=src_lines(models.IDM.forward),
            IDM_label=src_lines(models.IDM.label),
        ),
        utils=dict(
            create_decoder=src_lines(utils.create_decoder),
            create_dynamics_models=src_lines(utils.create_dynamics_models),
            create_policy=src_lines(utils.create_policy),
        ),
        data_loader=dict(normalize_obs=src_lines(data_loader.normalize_obs)),
    )
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    info = json.loads(json.dumps(info, default=str))
    (out_dir / "info.json").write_text(json.dumps(info, indent=1))
    if not args.no_readme:
        write_readme(out_dir, info, manifest)
    print(json.dumps(sizes, indent=1))
    for size, sinfo in info.items():
        if isinstance(sinfo, dict) and "idm" in sinfo and "min_pre_relu_margin" in sinfo["idm"]:
            m = sinfo["idm"]
            print(f"[{size}] near-tie margins (IDM, eval): smallest VQ distance gap {m['min_vq_dist_margin']:.3g}, "
                  f"smallest |pre-ReLU value| {m['min_pre_relu_margin']:.3g}"
                  + ("  <- a near-tie: check-reference will name the rows it flips" if
                     min(m["min_vq_dist_margin"], m["min_pre_relu_margin"]) < 1e-6 else ""))


# ----------------------------------------------------------------------------- README


def _mb(n):
    return f"{n / 1e6:.1f} MB"


def _shape(manifest, fname, key):
    e = manifest[fname][key]
    return f"{tuple(e['shape'])} {e['dtype']}"


def _keys(manifest, fname, prefix):
    return [k for k in manifest[fname] if k.startswith(prefix)]


def write_readme(out_dir: Path, info: dict, manifest: dict):
    L = info["source_lines"]["models"]
    U = info["source_lines"]["utils"]
    DL = info["source_lines"]["data_loader"]
    env = info["env"]
    P, S = info["paper"], info["small"]

    def ml(name):
        a, b = L[name]
        return f"`lapo/models.py` lines {a}-{b}"

    def ul(name):
        a, b = U[name]
        return f"`lapo/utils.py` lines {a}-{b}"

    st1 = P["stage1_step"]["lines"]
    st2 = P["stage2_step"]["lines"]
    st3 = P["stage3"]["lines"]
    r = []
    w = r.append
    w("# LAPO reference fixtures\n")
    w(
        "Numeric fixtures produced by running the authors' reference implementation of LAPO "
        "(\"Learning to Act without Actions\", Schmidt & Jiang, ICLR 2024), "
        f"`github.com/schmidtdominik/LAPO` at commit `{env['reference_commit']}`, "
        "so that another implementation can load the same weights and inputs and check that it computes the same outputs.\n"
    )
    w("Everything here was generated by `make_fixtures.py` (one level above this folder). "
      "The model classes are the reference's own (`lapo/models.py`, `lapo/utils.py`), and the stage-1/2/3 steps execute "
      "the reference scripts' own statements: `make_fixtures.py` picks them out of `stage1_idm.py`, `stage2_bc.py` and "
      "`stage3_decoding.py` by their AST (line ranges below) and `exec`s them in a namespace that supplies the models, "
      "a one-batch iterator and a logger that captures the values. Nothing in the forward passes is reimplemented.\n")

    w("## Regenerate\n")
    w("```bash\n"
      "mkdir -p $REF/LAPO\n"
      "# reference source without the large media folder (bare repo from the `fetch` tool: github:schmidtdominik/LAPO)\n"
      "D=$LAPO_GIT\n"
      "git --git-dir=$D archive HEAD $(git --git-dir=$D ls-tree -r --name-only HEAD | grep -v videos_and_figures) | tar -x -C $REF/LAPO\n"
      "python3 -m venv $REF/venv\n"
      "$REF/venv/bin/pip install torch==2.13.0 \"numpy<2\" doy==1.9.2 gym==0.23.1 procgen-mirror tensordict omegaconf wandb funcy tqdm matplotlib rich torchinfo einops\n"
      "WANDB_MODE=disabled $REF/venv/bin/python $REF/make_fixtures.py --out $REF/fixtures\n"
      "# determinism check: a second run into another folder, then compare every array bit for bit\n"
      "WANDB_MODE=disabled $REF/venv/bin/python $REF/make_fixtures.py --out $REF/fixtures_rerun\n"
      "$REF/venv/bin/python $REF/compare_fixtures.py $REF/fixtures $REF/fixtures_rerun\n"
      "# self-check: rebuild the reference models with another seed, load param/*+buffer/* from the files, recompute every\n"
      "# stored output from the stored inputs and require bit-identical results\n"
      "WANDB_MODE=disabled $REF/venv/bin/python $REF/verify_fixtures.py $REF/fixtures\n"
      "```\n")
    w("The arrays are written with `np.savez_compressed`. `frames_preview.png` shows the 4 windows (rows = envs, columns = t).\n")
    w("## Using the fixtures from another implementation\n")
    w("```python\n"
      "import numpy as np\n"
      "d = np.load('fdm_small.npz')\n"
      "state = {k.split('/', 1)[1]: v for k, v in d.items() if k.split('/')[0] in ('param', 'buffer')}  # reference state_dict names\n"
      "my_fdm.load_reference_state(state)                      # map names/layouts to your model\n"
      "pred = my_fdm(d['input/state_seq'], d['input/action'], train=True)   # BatchNorm with batch statistics\n"
      "np.testing.assert_allclose(pred, d['output/train/wm_pred'], rtol=1e-4, atol=1e-5)\n"
      "np.testing.assert_allclose(mse(pred, d['input/target']), d['output/train/loss'], rtol=1e-4)\n"
      "```\n"
      "Conv weights are PyTorch layout (out, in, kH, kW); `ConvTranspose2d` weights are (in, out, kH, kW); Linear weights are (out, in).\n")
    w("Generation takes ~15 s on 2 CPU cores. Environment of the stored run:\n")
    w("| item | value |\n|---|---|")
    for k in ("reference_commit", "python", "torch", "numpy", "tensordict", "doy", "cpu_capability", "num_threads", "deterministic", "seed", "procgen_seed", "warmup_steps"):
        w(f"| {k} | `{env[k]}` |")
    w("| omegaconf / gym / procgen | `" + env.get("others", "") + "` |")
    w("")
    w("`torch.manual_seed(0)` is called before building each size's models; `torch.use_deterministic_algorithms(True)`; "
      "`torch.set_num_threads(1)`; device CPU (`config.DEVICE == 'cpu'`). Two runs give bit-identical arrays "
      "(`manifest.json` holds a SHA-256 of every array's bytes; the .npz zip containers themselves carry timestamps, so compare arrays, not files).\n")
    w("**Tolerances.** The values are bit-reproducible with this torch build on this CPU. A different framework or kernel "
      "library will differ in the last bits: compare floats with a tolerance (e.g. `rtol=1e-4, atol=1e-5` for forward outputs, "
      "looser for parameters after an optimiser step, where Adam's first update is ~lr*sign(grad) and so tiny gradients can flip sign), "
      "and integer outputs (VQ indices) exactly. `output/derived/vq_dist_margin` in the IDM files gives, per latent, the gap between "
      "the nearest and second-nearest codebook distance, so you can see how robust each argmin is "
      f"(smallest gap: paper {P['idm']['min_vq_dist_margin']:.3g}, then {P['idm']['second_vq_dist_margin']:.3g}; small {S['idm']['min_vq_dist_margin']:.3g}, "
      f"then {S['idm']['second_vq_dist_margin']:.3g}; squared-distance units. Flipping the paper's closest call needs an error of roughly 2e-6 in `la`, "
      "about 100x float32 noise; the FDM files take the stored `la_q` as their input, so they do not depend on it).\n")
    w("How large such differences get was measured by regenerating with 2 intra-op threads (`--threads 2`) and comparing with the stored "
      "1-thread run: `frames`, `idm_*`, `policy_*` and `stage3_policy_*` were bit-identical; in `fdm_*`, `stage1_*` and `stage2_*`:\n"
      "- forward outputs and losses (FDM predictions, activations, `loss`, `grad_norm`) differed by at most 2.3e-7 relative to the array's largest |value|;\n"
      "- the gradients of the conv biases that feed a BatchNorm (`wm.down.{0..4}.conv.bias`, `wm.up.{0..5}.conv.bias`) are mathematically "
      "zero in train mode (BatchNorm subtracts the batch mean), so their stored values (1e-13 to 1e-7) are rounding noise and differed by up to "
      "100 %: compare them only against an absolute tolerance scaled by the largest gradient, or skip them;\n"
      "- Adam's first step moves every element by about lr*sign(grad), so an element whose gradient is near zero can land anywhere within +-lr: "
      "`param_after` differed by up to 5.2e-5 (`wm.down.0.conv.weight`/`.bias`; lr 3e-5). Compare `param_after` with `atol` of about 2*lr "
      "(6e-5 for the stage-1 step, 7.1e-5 at step 1 of `stage1_2steps_small`, 4e-6 for stage 2, 2e-3 for the decoder's Adam step), and "
      "check the gradients themselves with a relative tolerance; `buffer_after/wm.down.0.norm.running_mean` after the second step inherits "
      "the same effect (5.6e-5).\n")

    w("## Conventions\n")
    w("- Load with `d = np.load(path)`; keys are strings with `/` separators.\n"
      "- `param/<k>`: a `state_dict()` entry that is an `nn.Parameter`; `buffer/<k>`: any other `state_dict()` entry "
      "(BatchNorm `running_mean`/`running_var`/`num_batches_tracked`, VQ `embedding`/`ema_count`/`ema_weight`). "
      "Together they are exactly the reference `state_dict()`: "
      "`model.load_state_dict({k.split('/', 1)[1]: torch.from_numpy(v) for k, v in d.items() if k.split('/')[0] in ('param', 'buffer')})`.\n"
      "- `input/<name>`: inputs; `output/<name>`: results. `output/train/...` and `output/eval/...` are the same call with the module in "
      "`.train()` / `.eval()` mode; `.../act/<module>` is the output of that submodule (a forward hook: does not change numerics); "
      "`.../buffer_after/<k>` is a buffer's value after that forward.\n"
      "- dtypes: all float tensors float32; VQ indices, actions and `num_batches_tracked` int64; raw frames uint8; "
      "episode-start flags bool; learning rates and clip coefficients float64 (they are Python/NumPy floats in the reference). Scalars are 0-d arrays.\n"
      "- All files use the same 4 observation windows (`frames_starpilot.npz`), batch size 4.\n")

    w("## Input data: `frames_starpilot.npz`\n")
    fr = "frames_starpilot.npz"
    w(f"- `procgen.ProcgenGym3Env(num=4, env_name='starpilot', distribution_mode='easy', num_levels=0, start_level=0, rand_seed={env['procgen_seed']})` "
      "(package `procgen-mirror` 0.10.7, the one the reference's requirements.txt names for Python 3.11).\n"
      f"- `actions = np.random.default_rng(0).integers(0, 15, size=({env['warmup_steps'] + 3}, 4))`; for t = 0..{env['warmup_steps'] + 2}: "
      f"`env.observe()` (record frame t), then `env.act(actions[t])` (except after the last frame). The window is frames "
      f"{env['warmup_steps']}, {env['warmup_steps'] + 1}, {env['warmup_steps'] + 2} of each of the 4 envs (no episode start inside it: `input/firsts`).\n"
      "- Layout, exactly as the reference data loader builds it: procgen gives HWC uint8; `data_loader._load_chunk` does "
      "`obs.permute(0, 3, 1, 2)` (CHW), `_unfold_td` stacks consecutive frames along dim 1, so a window is `(B, T=3, C=3, 64, 64)`, "
      "T ordered oldest to newest, C = RGB.\n"
      f"- Normalisation: `data_loader.normalize_obs` (`lapo/data_loader.py` lines {DL['normalize_obs'][0]}-{DL['normalize_obs'][1]}): `obs.float() / 255 - 0.5` (float32, range [-0.5, 0.5]).\n")
    w("| key | shape / dtype | meaning |\n|---|---|---|")
    desc = {
        "input/obs_uint8": "the 4 windows, raw (B, T, C, H, W)",
        "input/obs": "the same, normalised: the stage-1 batch `batch['obs']`",
        "input/ta_window": "`ta_window[b, t]` = action taken at window frame t; `[:, -2]` is the action between frames -2 and -1 (the transition the IDM labels); `[:, -1]` was drawn but not executed",
        "input/all_frames_hwc_uint8": "every recorded frame (B, 43, H, W, C)",
        "input/all_actions": "the action array (43, B)",
        "input/firsts": "procgen `first` flags (B, 43)",
    }
    for k in manifest[fr]:
        w(f"| `{k}` | {_shape(manifest, fr, k)} | {desc.get(k, '')} |")
    w("")

    w("## Model configuration\n")
    w("From `lapo/config.yaml` via `config.get(use_cli_args=False, override_args=['env_name=starpilot', 'exp_name=fixtures', "
      "'model.wm_scale=..', 'model.idm_impala_scale=..', 'model.policy_impala_scale=..'])`; "
      "`la_dim = num_codebooks * num_discrete_latents * emb_dim = 2*4*16 = 128`, `ta_dim = 15`, `config.ADD_TIME_HORIZON = 1` "
      "(IDM sees 3 frames, FDM 2 context frames).\n")
    w("| setting | paper | small |\n|---|---|---|")
    for k in ("wm_scale", "idm_impala_scale", "policy_impala_scale", "la_dim", "ta_dim"):
        w(f"| `model.{k}` | {P['cfg_model'][k]} | {S['cfg_model'][k]} |")
    for k, v in P["cfg_model"]["vq"].items():
        w(f"| `model.vq.{k}` | {v} | {S['cfg_model']['vq'][k]} |")
    w("")
    w("The paper size is `config.yaml` as shipped (`wm_scale: 24`, IMPALA scale 4). The small size uses IMPALA scale 1 and "
      "`wm_scale=2`, the smallest FDM base size the code can run: with `wm_scale=1`, `ResidualLayer(b, b // 2)` gets 0 hidden "
      "channels and the forward pass fails (`RuntimeError: Given groups=1, expected weight to be at least 1 at dimension 0`). "
      "The VQ settings are the same at both sizes.\n")

    w("## Parameter counts\n")
    w("| model | paper | small |\n|---|---|---|")
    w(f"| IDM (`models.IDM`, incl. its `policy_head`; VQ has no parameters) | {P['idm']['n_params']:,} | {S['idm']['n_params']:,} |")
    w(f"| IDM buffer elements (VQ `embedding` 2x64x16, `ema_count` 2x64, `ema_weight` 2x64x16) | {P['idm']['n_buffer_elems']:,} | {S['idm']['n_buffer_elems']:,} |")
    w(f"| FDM (`models.WorldModel`) | {P['fdm']['n_params']:,} | {S['fdm']['n_params']:,} |")
    w(f"| FDM buffer elements (BatchNorm stats incl. `num_batches_tracked`) | {P['fdm']['n_buffer_elems']:,} | {S['fdm']['n_buffer_elems']:,} |")
    w(f"| IDM + FDM (stage-1 optimiser) | {P['idm']['n_params'] + P['fdm']['n_params']:,} | {S['idm']['n_params'] + S['fdm']['n_params']:,} |")
    w(f"| latent policy (`models.Policy`, action_dim = la_dim = 128; incl. unused value_head) | {P['policy']['n_params']:,} | {S['policy']['n_params']:,} |")
    w(f"| stage-3 RL policy, unique parameters | {P['stage3']['n_params_unique']:,} | {S['stage3']['n_params_unique']:,} |")
    w(f"| stage-3 RL policy, `requires_grad=True` (everything except `fc_sl`, `policy_head_sl`) | {P['stage3']['n_params_trainable']:,} | {S['stage3']['n_params_trainable']:,} |")
    w(f"| stage-3 decoder (`utils.create_decoder(128, 15, hidden_sizes=(192, 128, 64))`) | {P['stage3']['n_decoder']:,} | {S['stage3']['n_decoder']:,} |")
    w("")

    # ---------------------------------------------------------------- per-file
    w("## Files\n")
    w("| file | size |\n|---|---|")
    for k, v in info["file_sizes"].items():
        w(f"| `{k}` | {_mb(v)} |")
    w("| `manifest.json` | shape, dtype, SHA-256 of every array |\n| `info.json` | everything this README is generated from (configs, line numbers, structure tables, scalars) |")
    w("")
    w("All sizes are stored in full; nothing had to be dropped for the 40 MB limit. In `stage1_step_paper.npz` and "
      "`stage2_step_paper.npz` only selected parameters (listed below) are stored after the step; the small files store all of them.\n")

    # IDM
    w("### `idm_paper.npz`, `idm_small.npz`: latent inverse dynamics model with VQ\n")
    w(f"- Reference: class `IDM` ({ml('IDM')}; `forward` {L['IDM_forward'][0]}-{L['IDM_forward'][1]}, `label` {L['IDM_label'][0]}-{L['IDM_label'][1]}), "
      f"encoder from `get_impala` ({ml('get_impala')}), `ConvSequence` ({ml('ConvSequence')}), `ImpalaResidualBlock` ({ml('ImpalaResidualBlock')}); "
      f"quantiser `VQEmbeddingEMA` ({ml('VQEmbeddingEMA')}; `forward_2d` {L['VQEmbeddingEMA_forward_2d'][0]}-{L['VQEmbeddingEMA_forward_2d'][1]}, "
      f"`forward` {L['VQEmbeddingEMA_forward'][0]}-{L['VQEmbeddingEMA_forward'][1]}).\n"
      f"- Built by `utils.create_dynamics_models(cfg.model)` ({ul('create_dynamics_models')}) as "
      "`IDM(cfg.model.vq, obs_shape=(9, 64, 64), action_dim=128, impala_scale=cfg.model.idm_impala_scale)` with defaults "
      "`impala_channels=(16, 32, 32)`, `impala_features=256`; VQ: `VQEmbeddingEMA(cfg.model.vq)` with `epsilon=1e-5` "
      "(num_codebooks 2, num_embs 64, emb_dim 16, num_discrete_latents 4, commitment_cost 0.05, decay 0.999).\n"
      "- IMPALA CNN (`get_impala`): for each of `impala_scale * (16, 32, 32)` channels a `ConvSequence` = Conv2d 3x3 pad 1 -> "
      "`max_pool2d(kernel 3, stride 2, padding 1)` -> 2 x `ImpalaResidualBlock` (`x + conv1(relu(conv0(relu(x))))`, 3x3 pad 1, no in-place ReLU); "
      "64 -> 32 -> 16 -> 8 px; then Flatten -> ReLU -> `fc` Linear(8 * 8 * 32 * scale, 256); the IDM/policy applies `relu` again and its `policy_head` Linear(256, 128). "
      "No normalisation layers; all layers PyTorch default init.\n"
      f"- Parameters: paper {P['idm']['n_params']:,}, small {S['idm']['n_params']:,} (+4,224 buffer elements).\n"
      "- Input `input/obs`: (4, 3, 3, 64, 64) float32, the normalised windows; `merge_TC_dims` views it as (4, 9, 64, 64), channel = 3*t + c.\n"
      "- Calls: `m = copy.deepcopy(idm0)` (fresh copy of the stored weights for each mode), then\n"
      "  - eval: `m.eval(); with torch.no_grad(): action_td, vq_loss, vq_perp = m(obs)`;\n"
      "  - train: `m.train(); action_td, vq_loss, vq_perp = m(obs)` (grad enabled, as in stage 1).\n")
    w("| key (for `<mode>` = eval, train) | paper | small | meaning |\n|---|---|---|---|")
    fp, fs = "idm_paper.npz", "idm_small.npz"
    idm_desc = {
        "la": "`action_td['la']`: pre-quantisation latent = `policy_head(relu(fc(conv_stack(x))))`",
        "la_q": "`action_td['la_q']`: quantised latent (straight-through value = codebook entries)",
        "la_qinds": "`action_td['la_qinds']`: code indices, (B, num_codebooks, num_discrete_latents, 1)",
        "vq_loss": "`commitment_cost * F.mse_loss(x, quantized.detach())`",
        "vq_perp": "sum over codebooks of exp(entropy of the batch-averaged one-hot codes)",
        "act/conv_stack.0": "ConvSequence 0 output",
        "act/conv_stack.1": "ConvSequence 1 output",
        "act/conv_stack.2": "ConvSequence 2 output",
        "act/conv_stack": "after Flatten + ReLU",
        "act/fc": "fc output, before the ReLU",
        "act/policy_head": "= la",
        "buffer_after/vq.embedding": "codebook after the forward (eval: unchanged; train: after ONE EMA update)",
        "buffer_after/vq.ema_count": "EMA cluster sizes after the forward",
        "buffer_after/vq.ema_weight": "EMA code sums after the forward",
    }
    for k, d_ in idm_desc.items():
        w(f"| `output/<mode>/{k}` | {_shape(manifest, fp, 'output/eval/' + k)} | {_shape(manifest, fs, 'output/eval/' + k)} | {d_} |")
    w(f"| `output/derived/vq_dist_margin` | {_shape(manifest, fp, 'output/derived/vq_dist_margin')} | {_shape(manifest, fs, 'output/derived/vq_dist_margin')} | not a reference output: per (codebook, b*4+latent), 2nd-smallest minus smallest squared distance (float64 maths), eval mode |")
    w("")
    w("In train mode `la`, `la_q`, `la_qinds`, `vq_loss`, `vq_perp` equal eval mode bit for bit (no BatchNorm in the IMPALA CNN; "
      "the VQ quantises with the codebook *before* its EMA update). Only `buffer_after/vq.*` differ.\n")
    w(f"Values: paper eval `vq_loss` = {P['idm']['vq_loss_eval']:.9g}, `vq_perp` = {P['idm']['vq_perp_eval']:.9g}; "
      f"small eval `vq_loss` = {S['idm']['vq_loss_eval']:.9g}, `vq_perp` = {S['idm']['vq_perp_eval']:.9g}.\n")
    w("**VQ details a reimplementation must match** (`VQEmbeddingEMA.forward`/`forward_2d`):\n"
      "- `la` (B, 128) is viewed as (B, N*D, L, 1) with N = 2 codebooks, D = 16, L = 4 latents, i.e. element `i` of `la` is "
      "codebook `n = i // 64`, dimension `d = (i // 4) % 16`, latent `l = i % 4` (latent index fastest, not the embedding dim). "
      "Each (b, n, l) vector of D=16 values is quantised against codebook n; `la_q` is laid out the same way; "
      "`la_qinds[b, n, l, 0]` is the chosen code.\n"
      "- distances: `torch.baddbmm(sum(e**2) + sum(x**2), x, e^T, alpha=-2, beta=1)`, argmin (first index on ties).\n"
      "- train-mode EMA update, in this order: `ema_count = decay*ema_count + (1-decay)*counts`; "
      "`n = ema_count.sum(-1)`; `ema_count = (ema_count + 1e-5) / (n + 64*1e-5) * n`; "
      "`ema_weight = decay*ema_weight + (1-decay) * (one_hot^T @ x)`; `embedding = ema_weight / ema_count[..., None]`.\n"
      "- Init: `embedding ~ U(-5/64, 5/64)`, `ema_weight = embedding.clone()`, **`ema_count = zeros`**. Because the counts start at "
      "zero, the first training-mode forward divides by tiny counts and the codebook jumps to magnitudes of ~1e2-1e4 "
      "(`output/train/buffer_after/vq.embedding`); this is the reference behaviour, and `stage1_2steps_small.npz` shows its effect on the next step "
      "(vq_loss jumps from ~1e-4 to ~4, perplexity collapses to 2).\n"
      "- `vq_loss = commitment_cost * mse(x, quantized)`; `la_q = quantized.detach() + (x - x.detach())` (straight-through); "
      "`perplexity = sum_n exp(-sum_m p_nm log(p_nm + 1e-10))` with `p_nm` the batch mean of the one-hot codes.\n")

    # FDM
    w("### `fdm_paper.npz`, `fdm_small.npz`: forward dynamics model (`WorldModel`, a U-Net)\n")
    w(f"- Reference: class `WorldModel` ({ml('WorldModel')}; `forward` {L['WorldModel_forward'][0]}-{L['WorldModel_forward'][1]}, "
      f"`label` {L['WorldModel_label'][0]}-{L['WorldModel_label'][1]}), blocks `DownsampleBlock` ({ml('DownsampleBlock')}), "
      f"`UpsampleBlock` ({ml('UpsampleBlock')}), `ResidualLayer` ({ml('ResidualLayer')}).\n"
      f"- Built by `utils.create_dynamics_models` as `WorldModel(action_dim=128, in_depth=6, out_depth=3, base_size=cfg.model.wm_scale)` "
      "(paper `base_size=24`, small `base_size=2`). All layers use PyTorch default init; BatchNorm2d defaults (eps 1e-5, momentum 0.1, affine).\n"
      f"- Parameters: paper {P['fdm']['n_params']:,}, small {S['fdm']['n_params']:,}.\n"
      "- Inputs: `input/obs` (4, 3, 3, 64, 64) the windows; `input/state_seq` = `obs[:, :-1]` (4, 2, 3, 64, 64), the context "
      "frames (merged to 6 channels, channel = 3*t + c); `input/action` (4, 128) = the IDM's `la_q` for these windows (eval-mode "
      "`output/eval/la_q` of the same size's `idm_*.npz`, equal to the train-mode one); `input/target` = `obs[:, -1]` (4, 3, 64, 64).\n"
      "- Calls: `m = copy.deepcopy(wm0)`; `batch = TensorDict(dict(obs=obs, la_q=action), batch_size=4)`; "
      "`loss = m.label(batch)`, which is `batch['wm_pred'] = m(obs[:, :-1], la_q); loss = F.mse_loss(batch['wm_pred'], obs[:, -1])`.\n"
      "  - train: `m.train()`, grad enabled: BatchNorm normalises with the batch statistics (biased variance) and updates its running stats "
      "(momentum 0.1, unbiased variance): `output/train/buffer_after/*`.\n"
      "  - eval: `m.eval()` under `torch.no_grad()`: BatchNorm uses the initial running stats (mean 0, var 1).\n"
      "- Forward: `x = cat([state (6 ch), la broadcast to 64x64 (128 ch)])`; 5 DownsampleBlocks (conv3x3 -> BN -> ResidualLayer -> maxpool2 -> ReLU) "
      "64->2 px, then `down.5` = Conv2d(16b, 32b, k=2) -> 1x1; the skip list's last entry is replaced by the latent action (B, 128, 1, 1); "
      "`up.i` takes `cat([x, skip])` (for up.0 the skip is the action), ConvTranspose2d(k=2, s=2) -> BN -> ResidualLayer -> ReLU; "
      "`final_conv` on `cat([x, state])` = Conv2d(b + 6, b, 3, pad 1) -> ResidualLayer(b, b // 2) -> ReLU -> Conv2d(b, 3, 1); output `tanh(out) / 2`. "
      "`ResidualLayer(c, h)` = `x + conv(h->c)(relu(conv(c->h)(relu(x))))` (3x3 pad 1, ReLUs not in place, so the skip adds the pre-ReLU x). "
      "(The `forward` docstring says `action.shape = (B, L)`; it is (B, la_dim) = (B, 128), reshaped to (B, 128, 1, 1) and tiled to 64x64 for the input.)\n")
    w("| key (for `<mode>` = train, eval) | paper | small | meaning |\n|---|---|---|---|")
    fp, fs = "fdm_paper.npz", "fdm_small.npz"
    fdesc = {"wm_pred": "predicted next frame, `tanh(final_conv(...)) / 2`", "loss": "stage-1 FDM loss `F.mse_loss(wm_pred, target)`"}
    for nm in WM_ACT_NAMES:
        fdesc["act/" + nm] = "block output" + (" (pre-tanh)" if nm == "final_conv" else "")
    for k, d_ in fdesc.items():
        w(f"| `output/<mode>/{k}` | {_shape(manifest, fp, 'output/train/' + k)} | {_shape(manifest, fs, 'output/train/' + k)} | {d_} |")
    w(f"| `output/<mode>/buffer_after/<bn>.running_mean`, `.running_var`, `.num_batches_tracked` | | | BatchNorm state after the forward (train: updated, eval: unchanged) |")
    w("")
    w(f"Values: paper loss train {P['fdm']['loss_train']:.9g}, eval {P['fdm']['loss_eval']:.9g}; "
      f"small loss train {S['fdm']['loss_train']:.9g}, eval {S['fdm']['loss_eval']:.9g}.\n")

    # stage 1
    w("### `stage1_step_paper.npz`, `stage1_step_small.npz`: one stage-1 training step\n")
    w(f"- Reference: `lapo/stage1_idm.py` lines {st1['make_opt'][0]}-{st1['make_opt'][1]} (optimiser) and `train_step()` lines "
      f"{st1['train_step'][0]}-{st1['train_step'][1]}, executed verbatim with `step = 0`, `idm`, `wm` = fresh copies of the weights stored in "
      "`idm_<size>.npz` / `fdm_<size>.npz` (the same tensors, same seed), `train_iter` yielding one batch `TensorDict(obs=input/obs)`, "
      "and `logger` capturing its keyword arguments.\n"
      "- What `train_step` does: `idm.train(); wm.train(); lr_sched.step(0)`; `vq_loss, vq_perp = idm.label(batch)` (writes `la`, `la_q`, `la_qinds` into the batch); "
      "`wm_loss = wm.label(batch)`; `loss = wm_loss + vq_loss`; `opt.zero_grad(); loss.backward()`; "
      "`grad_norm = torch.nn.utils.clip_grad_norm_([*idm.parameters(), *wm.parameters()], 2)`; `opt.step()`.\n"
      f"- Optimiser: `doy.LRScheduler.make(all=(PiecewiseLinearSchedule([0, 50, 50001], [0.1*lr, lr, 0.01*lr]), [wm, idm]))` with lr = 3e-4 "
      f"-> `torch.optim.AdamW` (defaults: betas (0.9, 0.999), eps 1e-8, weight_decay 0.01, amsgrad False), one param group holding "
      f"`[*wm.parameters(), *idm.parameters()]` in that order, lr at step 0 = {P['stage1_step']['steps'][0]['lr']!r} (numpy float64 `0.1 * 3e-4`). "
      "The gradient flows from the FDM loss into the IDM through the straight-through `la_q`, and from `vq_loss` into the IDM; VQ buffers are not parameters.\n")
    for nm, SS in (("paper", P), ("small", S)):
        m0 = SS["stage1_step"]["steps"][0]
        w(f"- {nm}: loss {m0['loss']:.9g} (wm_loss {m0['wm_loss']:.9g} + vq_loss {m0['vq_loss']:.9g}), vq_perp {m0['vq_perp']:.9g}, "
          f"grad_norm {m0['grad_norm']:.9g} -> clip coefficient {m0['clip_coef']} (the clip is a no-op on this batch: norm < 2).")
    w("")
    w("| key | meaning |\n|---|---|")
    w("| `input/obs` | the batch (= `frames_starpilot.npz` `input/obs`) |")
    w("| `output/loss`, `output/wm_loss`, `output/vq_loss`, `output/vq_perp` | as logged by `train_step` (`loss = wm_loss + vq_loss`) |")
    w("| `output/grad_norm` | return value of `clip_grad_norm_`: total 2-norm of all IDM+FDM gradients **before** clipping |")
    w("| `output/clip_coef` | `min(1, 2 / (grad_norm + 1e-6))`, computed here (float64) |")
    w("| `output/lr` | lr used for the step (float64) |")
    w("| `output/batch/la`, `la_q`, `la_qinds`, `wm_pred` | what `idm.label` / `wm.label` wrote into the batch (train mode; equal to `idm_*` / `fdm_*` train outputs) |")
    w("| `output/grad_pre_clip/{idm,wm}.<param>` | gradient after `backward()`, before clipping (captured with a post-accumulate-grad hook) |")
    w("| `output/grad_post_clip/{idm,wm}.<param>` | `.grad` after `clip_grad_norm_` (what AdamW used) |")
    w("| `output/param_after/{idm,wm}.<param>` | parameter after `opt.step()` |")
    w("| `output/buffer_after/{idm,wm}.<buffer>` | all buffers after the step (VQ after one EMA update, BN running stats after one update) |")
    w("")
    w("Parameters stored for the paper size (all parameters for the small size): IDM " + ", ".join(f"`{k}`" for k in STAGE1_SELECTED["idm"])
      + "; FDM " + ", ".join(f"`{k}`" for k in STAGE1_SELECTED["wm"]) + ".\n")
    w("### `stage1_2steps_small.npz`: two consecutive stage-1 steps (small size only)\n")
    w("Same as above, `train_step()` called at `step = 0` and `step = 1`, both on the same 4 windows (a fresh TensorDict each time). "
      "Keys `output/step{0,1}/{loss, wm_loss, vq_loss, vq_perp, grad_norm, lr, clip_coef, batch/*, grad_pre_clip/*}`, and after the second step "
      "`output/param_after/*` (all parameters) and `output/buffer_after/*`. This exercises AdamW's second step (bias correction), the lr schedule "
      "(step 1: lr = 0.1*lr + 0.9*lr/50) and the VQ's second EMA update.\n")
    for m0 in S["stage1_2steps"]["steps"]:
        w(f"- step {m0['step']}: lr {m0['lr']!r}, loss {m0['loss']:.9g} (wm {m0['wm_loss']:.9g}, vq {m0['vq_loss']:.9g}), vq_perp {m0['vq_perp']:.9g}, grad_norm {m0['grad_norm']:.9g}")
    w("")

    # policy
    w("### `policy_paper.npz`, `policy_small.npz`: latent policy (stage 2)\n")
    w(f"- Reference: class `Policy` ({ml('Policy')}), IMPALA encoder `get_impala` ({ml('get_impala')}), `layer_init` ({ml('layer_init')}); "
      f"built by `utils.create_policy(cfg.model, cfg.model.la_dim)` ({ul('create_policy')}) = "
      "`Policy(obs_shape=(3, 64, 64), action_dim=128, impala_scale=cfg.model.policy_impala_scale)` "
      "(defaults `impala_channels=(16, 32, 32)`, `impala_features=256`).\n"
      f"- Parameters: paper {P['policy']['n_params']:,}, small {S['policy']['n_params']:,} (including `value_head`, which stage 2 never trains).\n"
      "- Input `input/obs` (4, 3, 64, 64) float32 = `obs[:, -2]` of the windows (stage 2 feeds the last pre-transition frame, stage2_bc.py "
      "`policy(batch['obs'][:, -2])`). `input/la_target` (4, 128) = the same size's IDM eval-mode `la` (stage 2 runs the IDM in eval mode).\n"
      "- Calls (module in eval mode, `torch.no_grad()`; the network has no BatchNorm/dropout, train mode gives identical values, asserted):\n"
      "  - `output/latent_action` = `policy(obs)` = `policy_head(relu(fc(conv_stack(obs))))` (4, 128);\n"
      "  - `output/value` = `policy.get_value(obs)` = `value_head(relu(fc(conv_stack(obs))))` (4, 1);\n"
      "  - `output/act/conv_stack.{0,1,2}`, `output/act/conv_stack` (after Flatten+ReLU), `output/act/fc` (pre-ReLU);\n"
      "  - `output/stage2_loss` = `F.mse_loss(policy(obs), la_target)` (the stage-2 BC loss).\n"
      "- Note `layer_init(nn.Linear(256, 1), std=1)`: the reference's `if std is not None: std = np.sqrt(2)` means the value head is "
      "orthogonally initialised with gain sqrt(2), bias 0; all other layers use PyTorch default init.\n")
    w(f"Values: stage-2 loss paper {P['policy']['stage2_loss']:.9g}, small {S['policy']['stage2_loss']:.9g}.\n")

    w("### `stage2_step_paper.npz`, `stage2_step_small.npz`: one stage-2 BC step\n")
    w(f"- Reference: `lapo/stage2_bc.py` lines {st2['make_opt'][0]}-{st2['make_opt'][1]} (optimiser) and the first 9 statements of the training-loop body, "
      f"lines {st2['loop_body'][0]}-{st2['loop_body'][1]} (`" + "`; `".join(P["stage2_step"]["body"]) + "`), executed verbatim with `step = 0`, "
      "`policy` = copy of `policy_<size>.npz` weights, `idm` = copy of `idm_<size>.npz` in eval mode (stage2_bc.py line 22).\n"
      f"- Optimiser: AdamW (doy default; betas (0.9, 0.999), eps 1e-8, weight_decay 0.01) over `policy.parameters()`, schedule "
      f"`PiecewiseLinearSchedule([0, 1000, 60001], [0.01*lr, lr, 0])` with lr 2e-4 -> lr at step 0 = {P['stage2_step']['lr']!r}. No gradient clipping. "
      "`value_head` gets no gradient (grad None), so AdamW skips it: it is unchanged, with no weight decay.\n"
      "- Keys: `input/obs` (the 4 windows), `output/la_target` (IDM labels), `output/preds` (policy output), `output/loss`, `output/lr`, "
      "`output/param_after/<param>`, `output/grad/<param>` (gradient used by the step; absent for `value_head.*`).\n"
      f"- Paper size stores: " + ", ".join(f"`{k}`" for k in STAGE2_SELECTED) + "; small stores all parameters.\n")
    w(f"Values: loss paper {P['stage2_step']['loss']:.9g}, small {S['stage2_step']['loss']:.9g}.\n")

    # stage 3
    w("### `stage3_policy_paper.npz`, `stage3_policy_small.npz`: stage-3 RL policy (latent policy + online decoder) at init\n")
    w(f"- Reference: `lapo/stage3_decoding.py`, statements executed verbatim: lines {st3['create_policy'][0]}-{st3['create_policy'][1]} "
      "(`utils.create_policy(cfg.model, action_dim=128, state_dict=<latent policy>, strict_loading=True)`; here the latent policy is "
      f"the untrained `policy_<size>.npz` weights), {st3['decoder'][0]}-{st3['decoder'][1]} "
      "(`policy.decoder = create_decoder(in_dim=128, out_dim=15, hidden_sizes=(192, 128, 64))`, PyTorch default init), "
      f"{st3['sl_head_alias'][0]}-{st3['get_value_patch'][1]} (monkey patch: `policy_head_sl = policy_head`; new `policy_head_rl = nn.Linear(256, 15)` "
      f"with weight and bias set to 0; `fc_rl = fc`; `fc_sl = nn.Sequential(nn.Linear(fc.in_features, 256), nn.ReLU())` loaded with a copy of `fc`'s weights; "
      f"`fc_sl` and `policy_head_sl` frozen; `get_value` patched to use `fc_rl`), {st3['make_opt'][0]}-{st3['make_opt'][1]} (RL optimiser, "
      f"`torch.optim.Adam`, groups policy_head_rl / value_head / fc_rl, all lr 0 at step 0), {st3['buf_obs'][0]}-{st3['buf_ta'][1]}, and the functions "
      f"`action_selection_hook` ({st3['action_selection_hook'][0]}-{st3['action_selection_hook'][1]}), `reset_decoder` "
      f"({st3['reset_decoder'][0]}-{st3['reset_decoder'][1]}), `post_update_hook` ({st3['post_update_hook'][0]}-{st3['post_update_hook'][1]}).\n"
      f"- Parameters: unique paper {P['stage3']['n_params_unique']:,}, small {S['stage3']['n_params_unique']:,} "
      f"(decoder {P['stage3']['n_decoder']:,}; trainable paper {P['stage3']['n_params_trainable']:,}, small {S['stage3']['n_params_trainable']:,}).\n"
      "- State dict: `policy.state_dict()` as stage 3 saves it, so aliased modules appear twice: `policy_head.*` and `policy_head_sl.*` are the same tensors, "
      "as are `fc.*` and `fc_rl.*`. `fc_sl.0.*` is a separate copy (equal values at init). `policy_head_rl.*` is all zeros.\n"
      "- Input `input/obs` (4, 3, 64, 64) = `obs[:, -2]` (same as the policy files), `input/action` (4,) int64 = `ta_window[:, -2]` (the action taken at that frame).\n"
      "- Call: `with torch.no_grad(): action, logprob, entropy, value = action_selection_hook(obs, action=input/action)` (the PPO-update path: with "
      "the action given, nothing is sampled and the IDM buffers are not touched). Inside the hook: "
      "`h = conv_stack(obs)`; `hidden_rl = relu(fc_rl(h))`; `hidden_sl = relu(fc_sl(h))` (ReLU applied twice, harmless); "
      "`logits_rl = policy_head_rl(hidden_rl)`; `logits_sl = decoder(policy_head_sl(hidden_sl))`; `logits = (logits_rl + logits_sl) / 2`; "
      "`Categorical(logits=logits)`; value = `value_head(hidden_rl)`.\n")
    w("| key | shape (paper) | meaning |\n|---|---|---|")
    fp = "stage3_policy_paper.npz"
    s3 = {
        "output/act/conv_stack": "IMPALA features after Flatten+ReLU",
        "output/act/fc_rl": "`fc_rl(h)` (= `fc`, pre-ReLU)",
        "output/act/fc_sl": "`fc_sl(h)` (Linear+ReLU)",
        "output/act/policy_head_sl": "latent action predicted by the frozen latent head",
        "output/latent_action": "same as `output/act/policy_head_sl`",
        "output/act/value_head": "= value",
        "output/logits_rl": "`policy_head_rl(hidden_rl)`: exactly 0 at init",
        "output/logits_sl": "`decoder(latent_action)`",
        "output/logits": "`(logits_rl + logits_sl) / 2`, the averaged logits (= logits_sl / 2 at init)",
        "output/log_softmax": "`Categorical(logits=logits).logits` (normalised log-probs)",
        "output/logprob": "`log_prob(action)`",
        "output/entropy": "`entropy()`",
        "output/value": "`value_head(hidden_rl)` (4, 1); equals `policy.get_value(obs)`",
        "input/decoder_la": "decoder SL input: IDM eval `la` on the windows (what `buf_la` collects: `idm(cat(last 3 obs))[0]['la']`)",
        "output/decoder_sl/outputs": "`decoder(decoder_la)` before the step",
        "output/decoder_sl/loss": "`F.cross_entropy(outputs, input/action, label_smoothing=0.05)`",
        "output/decoder_sl/param_after/decoder.<k>": "decoder weights after one `torch.optim.Adam(decoder.parameters())` step (lr 1e-3 default)",
    }
    for k, d_ in s3.items():
        shp = _shape(manifest, fp, k) if k in manifest[fp] else ""
        w(f"| `{k}` | {shp} | {d_} |")
    w("")
    w("The decoder SL fixture follows `post_update_hook`'s inner loop (lines "
      f"{st3['post_update_hook'][0]}-{st3['post_update_hook'][1]}) on one fixed batch of 4, without its `reset_decoder` (which re-draws the weights) "
      "and without the shuffling DataLoader; the labels pair the latent of window (o_{t-1}, o_t, o_{t+1}) with the action taken at o_t, "
      "as `buf_ta[1:-1]` does.\n")
    w(f"Values: paper logprob {['%.7g' % x for x in P['stage3']['logprob']]}, entropy {['%.7g' % x for x in P['stage3']['entropy']]}; "
      f"decoder SL loss paper {P['stage3']['decoder_sl_loss']:.9g}, small {S['stage3']['decoder_sl_loss']:.9g}.\n")

    # structure
    w("## FDM (`WorldModel`) layer by layer\n")
    w("Every module in `named_modules()` order, with its constructor arguments (`extra_repr`), its own parameters and the output shape "
      "for the fixture batch (B = 4, eval mode). `n` = parameters in the module and its children.\n")
    for nm, SS in (("paper (base_size=24)", P), ("small (base_size=2)", S)):
        w(f"### FDM, {nm}: {SS['fdm']['n_params']:,} parameters\n")
        w("| module | type | args | own parameters | n | output shape |\n|---|---|---|---|---|---|")
        for row in SS["fdm"]["structure"]:
            own = "; ".join(f"{pn} {tuple(sh)}" for pn, sh in row["params"])
            bufs = "; ".join(f"{bn} {tuple(sh)}" for bn, sh in row["buffers"] if bn != "num_batches_tracked")
            if bufs:
                own = own + ("; " if own else "") + "buffers: " + bufs
            outs = tuple(row["out_shape"]) if isinstance(row["out_shape"], list) else (row["out_shape"] or "-")
            args = row["args"].replace("|", "\\|")
            w(f"| `{row['name']}` | {row['type']} | {args} | {own} | {row['n_params_total']:,} | {outs} |")
        w("")

    w("## IDM and latent-policy parameter shapes\n")
    for title, key in (("IDM", "idm"), ("latent policy", "policy")):
        w(f"### {title}\n")
        w("| state_dict key | paper | small |\n|---|---|---|")
        kp = [k for k in manifest[f"{key}_paper.npz"] if k.startswith(("param/", "buffer/"))]
        for k in kp:
            w(f"| `{k}` | {tuple(manifest[f'{key}_paper.npz'][k]['shape'])} | {tuple(manifest[f'{key}_small.npz'][k]['shape'])} |")
        w("")

    w("## Not produced\n")
    w("- The PPO loss/update of stage 3 (`ppo.py`): it needs rollouts, advantages and returns from the RL loop; only the policy's forward "
      "(`action_selection_hook` with a given action) and one decoder SL step are stored. The sampling path (`action=None`) is not stored "
      "(random draws, and it runs the IDM into the online buffers).\n"
      "- Trained weights: there are no checkpoints; all weights are the reference's initialisation under `torch.manual_seed(0)`. "
      "Fixtures test the functions (forward, losses, one optimiser step), not trained behaviour.\n"
      "- The IDM/latent-decoder evaluation `utils.eval_latent_repr`/`train_decoder` (shuffled DataLoader over 131k frames) is not covered.\n"
      "- The gradient clip in stage 1 is exercised only as a no-op: at init the total norm is < 2 (values above).\n")
    (out_dir / "README.md").write_text("\n".join(r) + "\n")


if __name__ == "__main__":
    main()
