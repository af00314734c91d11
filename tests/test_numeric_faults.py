"""Numbers that go wrong are caught, not trained on: NaN and overflowing VQ inputs leave the codebook,
a diverged stage 1 says where, a gradient clip of 0 is no clip, and a fork after the thread pools
exits cleanly."""

import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import write_dataset

from lapo_fast.config import LAMConfig, PPOConfig, resolve
from lapo_fast.ops import NonFiniteError, VectorQuantizerEMA, vq_ema
from lapo_fast.runtime.checkpoint import load_latest, save_checkpoint


FORK_AND_EXIT = textwrap.dedent("""
    import os, sys, time
    import numpy as np, torch
    from lapo_fast.envs import ProcgenVecEnv
    from lapo_fast.ops import VectorQuantizerEMA
    env = ProcgenVecEnv("starpilot", 8, seed=0, num_threads=2)
    env.reset()
    env.step(np.zeros(8, np.int32))
    VectorQuantizerEMA(backend="cpu")(torch.randn(1 << 14, 128))  # large enough for its thread pool
    pid = os.fork()
    if pid == 0:
        VectorQuantizerEMA(backend="cpu")(torch.randn(1 << 14, 128))  # usable in the child, on one thread
        sys.exit(0)                      # and exits normally: finalizers and static destructors run
    _, status = os.waitpid(pid, 0)
    sys.exit(os.waitstatus_to_exitcode(status))
""")


def test_a_forked_child_exits_cleanly_after_the_engine_and_the_cpu_vq_kernel():
    try:
        done = subprocess.run([sys.executable, "-c", FORK_AND_EXIT], timeout=60, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        raise AssertionError("the forked child hung") from None
    assert done.returncode == 0, done.stderr[-2000:]


def test_kmeans_init_refuses_nan_before_touching_the_codebook():
    vq = VectorQuantizerEMA(kmeans_init=True, backend="reference")
    bad = torch.randn(64, 128)
    bad[3, 5] = float("nan")
    with pytest.raises(NonFiniteError):
        vq(bad)
    assert not bool(vq.initialized) and torch.isfinite(vq.codebook).all()
    assert torch.isfinite(vq(torch.randn(64, 128)).loss)


def test_empty_vq_batch_and_state_json_say_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match=r"x of shape \(0, 32\) holds no latents"):
        vq_ema(torch.zeros(0, 32), torch.zeros(2, 8, 16), torch.zeros(2, 8), torch.zeros(2, 8, 16))
    model = torch.nn.Linear(3, 2)
    path = save_checkpoint(tmp_path, 1, model)
    (path / "state.json").write_text('{"step": 1')
    with pytest.raises(ValueError, match="every checkpoint is damaged"):
        load_latest(tmp_path, model)


def test_a_diverged_stage_1_says_where_and_what_to_try(tmp_path, monkeypatch):
    import lapo_fast.ops.vq_module as vq_module

    from lapo_fast.stages.lam import train_lam

    def nan(*a, **k):
        raise NonFiniteError("nan")

    monkeypatch.setattr(vq_module, "vq_ema", nan)
    path = write_dataset(tmp_path / "ds", env=None)
    with pytest.raises(ValueError, match=r"stage 1 \(lam\) diverged at step 1: .* lower --lr"):
        train_lam(path, tmp_path / "run", resolve(LAMConfig, "smoke"), progress=False)


def test_ppo_grad_clip_0_is_no_clipping_not_zero_gradients():
    from lapo_fast.models import LatentPolicy
    from lapo_fast.data import prepare_obs
    from lapo_fast.runtime.ppo import make_ppo_step, ppo_epochs

    torch.manual_seed(0)
    start = LatentPolicy(impala_scale=1)
    obs = torch.randint(0, 255, (16, 64, 64, 3), dtype=torch.uint8)
    batch = (torch.randint(0, 15, (16,)), torch.full((16,), -2.7), torch.randn(16), torch.randn(16), torch.randn(16))
    weights = {}
    for clip in (0.0, 1e9):  # 0 must train exactly as no clip at all
        policy = LatentPolicy(impala_scale=1)
        policy.load_state_dict(start.state_dict())
        params = list(policy.parameters())
        cfg = resolve(PPOConfig, "smoke", {"grad_clip": clip, "minibatches": 2, "epochs": 1})
        step = make_ppo_step(policy, torch.optim.Adam(params, lr=1e-3), params, cfg, torch.device("cpu"),
                             lambda frames, p=policy: p.features(prepare_obs(frames)))
        inputs = dict(zip(("obs", "actions", "old_logp", "adv", "ret", "old_value"), (obs, *batch)))
        ppo_epochs(step, cfg, inputs, torch.Generator().manual_seed(1), torch.device("cpu"))
        weights[clip] = policy.state_dict()
    moved = [k for k in weights[0.0] if not torch.equal(weights[0.0][k], start.state_dict()[k])]
    assert moved, "grad_clip=0 left every weight untouched (gradients zeroed)"
    for k in weights[0.0]:
        torch.testing.assert_close(weights[0.0][k], weights[1e9][k], rtol=0, atol=0, msg=k)


def _vq_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    codebook = torch.randn(2, 64, 16, generator=g)
    return codebook, torch.ones(2, 64), codebook.clone()


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
@pytest.mark.parametrize("scale", [1e20, 1e30, 3e38])
def test_latents_whose_distances_overflow_are_refused_and_leave_the_codebook(backend, scale):
    state = _vq_state()
    before = [t.clone() for t in state]
    x = torch.full((8, 128), scale) * torch.where(torch.arange(128) % 2 == 0, 1.0, -1.0)  # finite: |x| <= 3e38
    assert torch.isfinite(x).all()
    with pytest.raises(NonFiniteError):
        vq_ema(x, *state, layout="lapo", num_latents=4, backend=backend)
    for t, old in zip(state, before):
        assert torch.equal(t, old)
    out = vq_ema(torch.randn(8, 128), *state, layout="lapo", num_latents=4, backend=backend)
    assert torch.isfinite(out.loss) and all(torch.isfinite(t).all() for t in state)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_overflow_under_the_cuda_policy_skips_the_update_and_makes_the_loss_nan(backend):
    state = _vq_state()
    before = [t.clone() for t in state]
    out = vq_ema(torch.full((8, 128), 1e25), *state, layout="lapo", num_latents=4, backend=backend,
                 raise_nonfinite=False)
    assert torch.isnan(out.loss)
    for t, old in zip(state, before):
        assert torch.equal(t, old)


@pytest.mark.parametrize("setting,value,message", [
    ("eps", 0.0, "eps must be a positive finite number"), ("eps", float("nan"), "eps must be a positive"),
    ("eps", -1e-5, "eps must be a positive"), ("decay", 1.0, "decay must be in"),
    ("decay", float("nan"), "decay must be in"), ("commitment", float("inf"), "commitment must be a finite"),
])
def test_the_ops_settings_are_checked_by_name_before_the_state_is_touched(setting, value, message):
    codebook = torch.randn(2, 64, 16)
    state = (codebook.clone(), torch.zeros(2, 64), codebook.clone())
    with pytest.raises(ValueError, match=message):
        vq_ema(torch.randn(8, 128), *state, layout="lapo", num_latents=4, **{setting: value})
    with pytest.raises(ValueError, match=message):
        VectorQuantizerEMA(**{setting: value})
    assert torch.equal(state[0], codebook) and not state[1].any()


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_a_second_derivative_through_the_kernels_is_an_error_not_a_wrong_number(backend):
    codebook = torch.randn(2, 64, 16)
    x = torch.randn(8, 128, requires_grad=True)
    out = vq_ema(x, codebook.clone(), torch.zeros(2, 64), codebook.clone(), layout="lapo", num_latents=4,
                 backend=backend)
    with pytest.raises(RuntimeError, match=f"no second derivative through the {backend} backend"):
        torch.autograd.grad(out.loss, x, create_graph=True)
    (g,) = torch.autograd.grad(out.loss, x)  # the first derivative is unchanged
    assert torch.isfinite(g).all()


def test_a_codebook_that_requires_grad_or_a_meta_tensor_is_named():
    codebook = torch.randn(2, 64, 16)
    with pytest.raises(ValueError, match="vq_ema: codebook requires grad, but the codebook learns by EMA"):
        vq_ema(torch.randn(8, 128), codebook.clone().requires_grad_(), torch.zeros(2, 64), codebook.clone(),
               layout="lapo", num_latents=4)
    meta = [t.to("meta") for t in (codebook, torch.zeros(2, 64), codebook)]
    with pytest.raises(NotImplementedError, match="vq_ema: meta tensors are not supported"):
        vq_ema(torch.randn(8, 128, device="meta"), *meta, layout="lapo", num_latents=4)


def test_vmap_and_func_grad_are_said_to_be_unsupported():
    from torch.func import grad, vmap

    codebook = torch.randn(2, 64, 16)

    def loss(x):
        return vq_ema(x, codebook.clone(), torch.zeros(2, 64), codebook.clone(), layout="lapo", num_latents=4,
                      training=False).loss

    for transform, x in ((vmap(loss), torch.randn(3, 8, 128)), (grad(loss), torch.randn(8, 128))):
        with pytest.raises(NotImplementedError, match="vq_ema: not supported under torch.func transforms"):
            transform(x)
