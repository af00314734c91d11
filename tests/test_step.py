"""runtime.step.TrainStep: the graph mode's static buffers give eager's numbers on the CPU (stage 2
and PPO's update; stage 1 in the selftest), its optimiser state round-trips through a checkpoint
between modes, and --cuda-graphs is refused on the CPU before any work."""

import contextlib
import copy
from dataclasses import replace

import numpy as np
import pytest
import torch

from lapo_fast.cli import main
from lapo_fast.config import BCConfig, FinetuneConfig, LAMConfig, resolve
from lapo_fast.data import DatasetWriter
from lapo_fast.models import DecodedPolicy, LatentPolicy
from lapo_fast.runtime.optim import adamw_warmup_decay
from lapo_fast.runtime.ppo import make_ppo_step
from lapo_fast.runtime.step import TrainStep, _optimizer_for, graph_mode
from lapo_fast.selftest import StaticBuffers
from lapo_fast.stages import bc
from lapo_fast.stages.lam import train_lam


def _bc_run(mode, steps=5):
    cfg = resolve(BCConfig, "smoke", {"batch_size": 6, "grad_clip": 1.0})
    torch.manual_seed(0)
    policy = LatentPolicy(impala_scale=1).to(memory_format=torch.channels_last)
    opt, schedule = replace(cfg, lr=1e-3, warmup_steps=2, steps=steps, warmup_from=0.1,
                            final_lr=0.0).optimizer(policy.parameters())
    step = bc.make_step(policy, policy, opt, schedule, cfg, torch.device("cpu"))
    step = StaticBuffers(step) if mode == "static" else step
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        out = step({"obs": torch.randint(0, 256, (6, 64, 64, 3), dtype=torch.uint8, generator=gen),
                    "target": torch.randn(6, 128, generator=gen)})
        losses.append(float(out["loss"].detach()))
    return losses, policy.state_dict(), out


def test_stage2_step_through_static_buffers_equals_eager():
    eager, w_eager, _ = _bc_run("eager")
    static, w_static, out = _bc_run("static")
    assert static == eager and len(set(eager)) == len(eager)  # the batches differ, so the losses do
    for k in w_eager:
        torch.testing.assert_close(w_static[k], w_eager[k], rtol=0, atol=0, msg=k)
    assert out["grad_norm"].ndim == 0  # clipped steps report the norm before the clip


def _ppo_run(mode):
    cfg = resolve(FinetuneConfig, "smoke", {"reference_clip": False})
    torch.manual_seed(0)
    policy = DecodedPolicy(LatentPolicy(impala_scale=1))
    with torch.no_grad():
        policy.action_head.weight.normal_(0, 0.1)
    params = [p for m in (policy.action_head, policy.value_head, policy.fc_rl) for p in m.parameters()]
    opt = torch.optim.Adam(params, lr=1e-3)
    step = make_ppo_step(policy, opt, params, cfg, torch.device("cpu"), features=lambda f: f)
    step = StaticBuffers(step) if mode == "static" else step
    gen = torch.Generator().manual_seed(2)
    stats = []
    for _ in range(4):
        out = step({"obs": torch.randn(16, policy.fc_rl.in_features, generator=gen).relu(),
                    "actions": torch.randint(0, 15, (16,), generator=gen),
                    "old_logp": -torch.rand(16, generator=gen) - 2, "adv": torch.randn(16, generator=gen),
                    "ret": torch.randn(16, generator=gen), "old_value": torch.randn(16, generator=gen)})
        stats.append([float(out[k].detach()) for k in ("policy_loss", "value_loss", "entropy", "clip_frac")])
    return stats, copy.deepcopy(policy.state_dict())


def test_ppo_update_through_static_buffers_equals_eager():
    eager, w_eager = _ppo_run("eager")
    static, w_static = _ppo_run("static")
    assert static == eager
    for k in w_eager:
        torch.testing.assert_close(w_static[k], w_eager[k], rtol=0, atol=0, msg=k)


def test_a_step_whose_input_shapes_change_is_refused_in_static_mode():
    lin = torch.nn.Linear(4, 1)
    step = StaticBuffers(TrainStep(lambda i: {"loss": lin(i["x"]).pow(2).mean()}, lin.parameters(),
                                   torch.optim.AdamW(lin.parameters()), grad_clip=0, device="cpu"))
    step({"x": torch.randn(3, 4)})
    with pytest.raises(ValueError, match="fixed shapes"):
        step({"x": torch.randn(5, 4)})


def test_optimizer_state_made_capturable_resumes_eagerly_with_the_same_steps():
    """A checkpoint of a graph run (lr a device tensor, capturable, step counts on the device)
    loads into an eager run and steps as an uninterrupted eager run does."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 2)
    twin = copy.deepcopy(lin)
    opt, sched = adamw_warmup_decay(lin.parameters(), lr=1e-2, weight_decay=0.1, warmup_steps=2, steps=6,
                                    warmup_from=0.1, final_lr=0.0)
    x = torch.randn(8, 4)
    loss_fn = lambda i: {"loss": lin(i["x"]).pow(2).mean()}  # noqa: E731
    step = TrainStep(loss_fn, lin.parameters(), opt, sched, grad_clip=1.0, device="cpu")
    for _ in range(2):
        step({"x": x})
    _optimizer_for(opt, capturable=True, device=torch.device("cpu"))  # as a graph run leaves it
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor) and opt.param_groups[0]["capturable"]
    saved = copy.deepcopy((opt.state_dict(), sched.state_dict()))
    _optimizer_for(opt, capturable=False, device=torch.device("cpu"))
    for _ in range(3):
        step({"x": x})

    opt2, sched2 = adamw_warmup_decay(twin.parameters(), lr=1e-2, weight_decay=0.1, warmup_steps=2, steps=6,
                                      warmup_from=0.1, final_lr=0.0)
    for _ in range(2):  # the same two first steps, then the checkpoint's state loaded over them
        TrainStep(lambda i: {"loss": twin(i["x"]).pow(2).mean()}, twin.parameters(), opt2, sched2, grad_clip=1.0,
                  device="cpu")({"x": x})
    opt2.load_state_dict(saved[0])
    sched2.load_state_dict(saved[1])
    resumed = TrainStep(lambda i: {"loss": twin(i["x"]).pow(2).mean()}, twin.parameters(), opt2, sched2,
                        grad_clip=1.0, device="cpu")
    assert not opt2.param_groups[0]["capturable"] and isinstance(opt2.param_groups[0]["lr"], float)
    for _ in range(3):
        resumed({"x": x})
    for a, b in zip(lin.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_cuda_graphs_are_refused_on_the_cpu_and_eager_is_the_default():
    assert graph_mode(False, torch.device("cpu"), "lam") == "eager"
    with pytest.raises(ValueError, match="lam: --cuda-graphs needs a CUDA device.*drop --cuda-graphs"):
        graph_mode(True, torch.device("cpu"), "lam")
    for cls in (LAMConfig, BCConfig, FinetuneConfig):
        cfg = resolve(cls, "paper")
        assert cfg.cuda_graphs is False


def test_stage1_with_cuda_graphs_on_the_cpu_stops_before_reading_data(tmp_path, capsys):
    with DatasetWriter(tmp_path / "ds") as w:
        w.add_episode(np.zeros((8, 64, 64, 3), np.uint8))
    cfg = resolve(LAMConfig, "smoke", {"cuda_graphs": True, "device": "cpu"})
    with pytest.raises(ValueError, match="--cuda-graphs needs a CUDA device"):
        train_lam(tmp_path / "ds", tmp_path / "run", cfg, progress=False)
    assert "loader" not in capsys.readouterr().out  # refused before the loader was planned
    with pytest.raises(SystemExit) as e:
        main(["bc", "--data", str(tmp_path / "ds"), "--out", str(tmp_path / "run"), "--preset", "smoke",
              "--device", "cpu", "--cuda-graphs"])
    assert e.value.code == 2 and "bc: --cuda-graphs needs a CUDA device" in capsys.readouterr().err


class _FakeStream:
    def __init__(self, *a, **k):
        pass

    def wait_stream(self, other):
        pass


def test_a_failed_capture_says_so_in_one_line_and_the_step_goes_on_eagerly(monkeypatch, capsys):
    """The graph mode's sequence on the CPU, CUDA's stream calls faked: three warm-up steps, then a
    capture that fails (as one with a host sync would), one line, and eager steps with eager's numbers."""
    from lapo_fast.runtime import step as step_mod

    calls = []
    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: _FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: calls.append("side stream") or contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())

    def capture(graph, capture_error_mode):
        calls.append(f"capture ({capture_error_mode})")
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore detail")

    monkeypatch.setattr(torch.cuda, "graph", capture)
    monkeypatch.setattr(step_mod, "_optimizer_for", lambda *a, **k: None)  # capturable Adam needs a GPU

    def run(mode):
        torch.manual_seed(0)
        lin = torch.nn.Linear(4, 1)
        opt = torch.optim.AdamW(lin.parameters(), lr=1e-2)
        step = TrainStep(lambda i: {"loss": lin(i["x"]).pow(2).mean()}, lin.parameters(), opt, grad_clip=1.0,
                         device="cpu", name="lam")
        step.mode = mode  # as on a CUDA device
        gen = torch.Generator().manual_seed(0)
        return [float(step({"x": torch.randn(8, 4, generator=gen)})["loss"].detach()) for _ in range(6)], step

    eager, _ = run("eager")
    graph, step = run("graph")
    assert graph == eager and step.mode == "eager" and step.graph is None
    assert calls == ["side stream"] * 3 + ["capture (thread_local)"]
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["lam: CUDA graph capture failed (RuntimeError: CUDA error: operation not permitted when stream is "
                   "capturing); running eagerly"]


def test_a_ctrl_c_whose_keyboard_interrupt_was_swallowed_still_stops_the_loop():
    """Python raises KeyboardInterrupt wherever the main thread is; inside a finalizer it is printed
    and dropped, and the run would go on. The loop remembers the signal."""
    import signal
    import types

    from lapo_fast.runtime.loop import supervised_loop

    calls = []

    def step(batch):
        calls.append(1)
        if len(calls) == 3:
            try:
                signal.raise_signal(signal.SIGINT)
            except KeyboardInterrupt:  # as a __del__ running at that moment would lose it
                pass
        return {"loss": torch.tensor(1.0)}

    class Loader:
        closed = False

        def __next__(self):
            return {}

        def close(self):
            Loader.closed = True

    cfg = types.SimpleNamespace(steps=1000, log_every=10**9, checkpoint_every=10**9)
    outside = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (CI's shell ignores it)
    try:
        with pytest.raises(KeyboardInterrupt):
            supervised_loop("stage x", cfg, step=0, train_step=step, loader=Loader(), names=("loss",),
                            schedule=None, log=None, save=lambda at: None, out=None, batch_size=1, progress=False)
        assert len(calls) == 3 and Loader.closed
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # ours removed
    finally:
        signal.signal(signal.SIGINT, outside)
