"""Stages 2 and 3 piece by piece: PPO's maths against references, the frozen trunk really frozen
and its feature reuse exact, bc's cached labels, decoders and probes, evaluation and its
normalisation, the report, and config resolution for `train`."""

import copy
import dataclasses
from dataclasses import replace
import json

import numpy as np
import pytest
import torch
from helpers import interrupt_after_checkpoint

from lapo_fast.config import BCConfig, DecodeConfig, FinetuneConfig, LAMConfig, PPOConfig, resolve
from lapo_fast.registry import resolve_run
from lapo_fast.data import DatasetWriter, FrameDataset, normalize, valid_starts
from lapo_fast.eval import EXPERT_RETURN, RANDOM_RETURN, evaluate, normalized_return
from lapo_fast.latent import accuracy, fit_decoder, load_decoder, probe, window_labels
from lapo_fast.envs import GAMES
from lapo_fast.models import DecodedPolicy, LatentPolicy
from lapo_fast.data import prepare_obs
from lapo_fast.rundir import RunDir
from lapo_fast.runtime.checkpoint import load_checkpoint
from lapo_fast.stages.bc import train_bc
from lapo_fast.stages.lam import train_lam
from lapo_fast.envs.wrappers import ScaleRewards
from lapo_fast.runtime.ppo import gae, make_ppo_step, ppo_epochs
from lapo_fast.stages.finetune import train_finetune
from lapo_fast.stages.ppo import train_ppo


# -- PPO ----------------------------------------------------------------------------------------

def _gae_loop(rewards, values, dones, gamma, lam):
    """Textbook GAE, one env and one step at a time."""
    T, N = rewards.shape
    adv = np.zeros((T, N))
    for n in range(N):
        running = 0.0
        for t in reversed(range(T)):
            nonterminal = 1.0 - dones[t, n]
            delta = rewards[t, n] + gamma * values[t + 1, n] * nonterminal - values[t, n]
            running = delta + gamma * lam * nonterminal * running
            adv[t, n] = running
    return adv


def test_gae_matches_the_textbook_loop():
    rng = np.random.default_rng(0)
    r, v, d = rng.normal(size=(7, 3)), rng.normal(size=(8, 3)), (rng.random((7, 3)) < 0.3).astype(float)
    adv, ret = gae(torch.tensor(r), torch.tensor(v), torch.tensor(d), 0.99, 0.95)
    np.testing.assert_allclose(adv.numpy(), _gae_loop(r, v, d, 0.99, 0.95), rtol=1e-12)
    np.testing.assert_allclose(ret.numpy(), adv.numpy() + v[:-1])
    # Known values: one step, done: advantage = r - V; lambda=0 is the one-step TD error.
    adv, _ = gae(torch.tensor([[2.0]]), torch.tensor([[0.5], [9.0]]), torch.tensor([[1.0]]), 0.9, 0.95)
    assert adv.item() == pytest.approx(1.5)


def test_reward_scale_matches_gyms_normalize_reward_and_resumes():
    """ScaleRewards (a gymnasium vector wrapper) against gym 0.26's NormalizeReward, baselines'
    formula, on scripted rewards and episode ends; its state carries over into a new wrapper."""
    import gym
    import gymnasium
    from gym.wrappers import NormalizeReward

    rng = np.random.default_rng(1)
    rewards, dones = rng.normal(size=(50, 4)), rng.random((50, 4)) < 0.1

    class Scripted(gym.Env):
        observation_space = gym.spaces.Box(0, 1, (1,))
        action_space = gym.spaces.Discrete(2)
        is_vector_env = True
        t = 0

        def step(self, action):
            self.t += 1
            return np.zeros((4, 1)), rewards[self.t - 1], dones[self.t - 1], np.zeros(4, bool), {}

    class ScriptedVec(gymnasium.vector.VectorEnv):
        num_envs, t = 4, 0

        def step(self, actions):
            self.t += 1
            return np.zeros((4, 1)), rewards[self.t - 1], dones[self.t - 1], np.zeros(4, bool), {}

    theirs = NormalizeReward(Scripted(), gamma=0.99)
    ours = ScaleRewards(ScriptedVec(), gamma=0.99)
    for t in range(50):
        expected = theirs.step(None)[1]
        if t == 30:  # a resumed run: a new wrapper given the checkpoint's state
            state, ours = ours.state_dict(), ScaleRewards(ours.env, gamma=0.99)
            ours.load_state_dict(state)
        np.testing.assert_allclose(ours.step(None)[1], np.clip(expected, -10, 10), rtol=1e-5)


@pytest.mark.parametrize("agent", ["latent policy, trunk frozen", "decoded policy (stage 3b)"])
def test_frozen_trunk_update_on_stored_features_equals_recomputing_them(agent):
    torch.manual_seed(0)
    cfg = resolve(FinetuneConfig, "smoke", {"num_envs": 4, "rollout": 8, "minibatches": 2, "epochs": 2})
    policy = LatentPolicy(impala_scale=1)
    policy.trunk.requires_grad_(False)
    if agent.startswith("decoded"):
        policy = DecodedPolicy(policy)
        with torch.no_grad():  # a non-zero action head, so every trained layer gets gradients
            policy.action_head.weight.normal_(0, 0.1)
    twin = copy.deepcopy(policy)
    obs = torch.randint(0, 256, (32, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        feats = policy.features(prepare_obs(obs))
    actions, old_logp = torch.randint(0, 15, (32,)), -torch.rand(32) - 2
    adv, ret = torch.randn(32), torch.randn(32)
    old_value = ret + 0.1 * torch.randn(32)
    outs = []
    for model, store, frozen in ((policy, feats, True), (twin, obs, False)):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=1e-2)
        features = (lambda x: x) if frozen else (lambda frames, m=model: m.features(prepare_obs(frames)))
        step = make_ppo_step(model, opt, params, cfg, torch.device("cpu"), features)
        batch = {"obs": store, "actions": actions, "old_logp": old_logp, "adv": adv, "ret": ret, "old_value": old_value}
        stats = ppo_epochs(step, cfg, batch, torch.Generator().manual_seed(3), torch.device("cpu"))
        outs.append((stats, model.state_dict()))
    (s1, w1), (s2, w2) = outs
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5, msg=k)
    assert s1["policy_loss"] == pytest.approx(s2["policy_loss"], rel=1e-4, abs=1e-6)


@pytest.fixture(scope="module")
def bc_run(tmp_path_factory):
    """A tiny dataset with actions, stage 1 and stage 2 trained on it (smoke sizes)."""
    root = tmp_path_factory.mktemp("bc")
    rng = np.random.default_rng(0)
    with DatasetWriter(root / "ds", source={"env": "starpilot", "distribution_mode": "easy"}) as w:
        for _ in range(4):
            w.add_episode(rng.integers(0, 255, (24, 64, 64, 3), dtype=np.uint8), action=rng.integers(0, 15, 24))
    run = root / "run"
    train_lam(root / "ds", run, resolve(LAMConfig, "smoke", {"steps": 4, "checkpoint_every": 4}), progress=False)
    train_bc(root / "ds", run, resolve(BCConfig, "smoke", {"steps": 6, "checkpoint_every": 3}), progress=False)
    return root / "ds", run


def test_finetuning_is_lapos_stage_3b(bc_run, tmp_path):
    """The agent starts as the decoded latent policy (zero action head); PPO trains the action head,
    value head and fc_rl; the conv trunk, the frozen fc copy and the latent head never change; the
    decoder is retrained online on the IDM's labels of the agent's own transitions."""
    _, run = bc_run
    agent = DecodedPolicy(RunDir(run).load_policy("bc"))
    obs = torch.randint(0, 256, (5, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        feats = agent.features(prepare_obs(obs))
        logits, _ = agent.act_value(feats)
        assert torch.equal(logits, agent.decoder(agent.latent(feats)) / 2)  # step 0: the decoded policy
    before = {k: v.clone() for k, v in agent.state_dict().items()}
    cfg = resolve(FinetuneConfig, "smoke", {"env_steps": 128, "num_envs": 4, "rollout": 16})
    last = train_finetune(tmp_path, "starpilot", cfg, agent, RunDir(run).load_lam().idm, progress=False)
    after = DecodedPolicy(LatentPolicy(impala_scale=1))
    load_checkpoint(last, after)
    for k, v in after.state_dict().items():
        if k.startswith(("conv.", "fc_sl.", "latent_head.")):
            assert torch.equal(v, before[k]), f"{k} changed but it is frozen"
        else:
            assert not torch.equal(v, before[k]), f"{k} did not train"
    rows = [json.loads(x) for x in (tmp_path / "finetune" / "metrics.jsonl").read_text().splitlines()]
    assert [r["env_steps"] for r in rows] == [64, 128] and all(r["lr"] >= 0 for r in rows)
    assert all(r["decoder_loss"] > 0 for r in rows)  # retrained after every update (smoke schedule)
    # The reference's clip (the default): the trunk took PPO's gradients (for the clipped norm), and
    # kept them, though it is not trained; without it the trunk runs on cached features, no gradient.
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in agent.conv.parameters())
    plain = DecodedPolicy(RunDir(run).load_policy("bc"))
    train_finetune(tmp_path, "starpilot", replace(cfg, reference_clip=False), plain, RunDir(run).load_lam().idm,
                   name="plain", progress=False)
    assert all(p.grad is None for p in plain.conv.parameters())


def test_ppo_resume_continues_at_the_saved_update(tmp_path):
    cfg = resolve(PPOConfig, "smoke", {"env_steps": 3 * 4 * 8, "num_envs": 4, "rollout": 8})
    with interrupt_after_checkpoint(1), pytest.raises(KeyboardInterrupt):
        train_ppo(tmp_path, "starpilot", cfg, name="p", progress=False)
    assert RunDir(tmp_path).checkpoint_step("p") == 1
    last = train_ppo(tmp_path, "starpilot", cfg, name="p", progress=False)
    assert last.name == "step-00000003"
    rows = [json.loads(x)["update"] for x in (tmp_path / "p" / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3]


# -- stage 2 ------------------------------------------------------------------------------------

def test_bc_labels_are_the_frozen_idms_latents_and_are_cached(bc_run):
    data, run = bc_run
    ds = FrameDataset(data)
    stamp = (run / "bc" / "labels.npz").stat().st_mtime_ns
    starts, latents, context = window_labels(RunDir(run), ds)
    assert (run / "bc" / "labels.npz").stat().st_mtime_ns == stamp  # loaded, not recomputed
    assert np.array_equal(starts, valid_starts(ds.episodes, context + 2))
    idm = RunDir(run).load_lam().idm
    for i in (0, 17, len(starts) - 1):
        window = normalize(torch.from_numpy(np.array(ds.cache()[starts[i]:starts[i] + context + 2][None])))
        with torch.no_grad():
            torch.testing.assert_close(idm(window).latent[0], torch.from_numpy(latents[i]), rtol=1e-4, atol=1e-5)


def test_bc_resume_equals_uninterrupted(bc_run, tmp_path):
    data, run = bc_run
    import shutil

    for name in ("a", "b"):
        shutil.copytree(run / "lam", tmp_path / name / "lam")
    cfg = resolve(BCConfig, "smoke", {"steps": 6, "checkpoint_every": 3})
    straight = train_bc(data, tmp_path / "a", cfg, progress=False)
    with interrupt_after_checkpoint(3), pytest.raises(KeyboardInterrupt):
        train_bc(data, tmp_path / "b", cfg, progress=False)
    assert RunDir(tmp_path / "b").checkpoint_step("bc") == 3
    resumed = train_bc(data, tmp_path / "b", cfg, progress=False)
    a, b = LatentPolicy(impala_scale=1), LatentPolicy(impala_scale=1)
    load_checkpoint(straight, a)
    load_checkpoint(resumed, b)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


# -- stage 3a, probes ---------------------------------------------------------------------------

def test_decoder_recovers_a_learnable_mapping_and_probe_reports_baselines():
    rng = np.random.default_rng(0)
    actions = rng.integers(0, 15, 600)
    centres = rng.normal(size=(15, 128)) * 3
    latents = (centres[actions] + rng.normal(size=(600, 128))).astype(np.float32)
    result = probe(latents, actions, labelled=300, held_out=300, steps=300)
    assert result["accuracy"] > 0.9 and result["chance"] == pytest.approx(1 / 15)
    held = np.random.default_rng(0).permutation(600)[:300]
    assert result["majority"] == pytest.approx(np.bincount(actions[held]).max() / 300)
    noise = rng.normal(size=(600, 128)).astype(np.float32)  # latents that carry nothing
    assert probe(noise, actions, labelled=300, held_out=300, steps=300)["accuracy"] < 0.2
    with pytest.raises(ValueError, match="as many actions"):
        fit_decoder(latents[:5], actions[:4])
    assert accuracy(fit_decoder(latents[:50], actions[:50], steps=200), latents[:50], actions[:50]) > 0.95
    assert result["linear_accuracy"] > 0.9  # separable clusters: a linear probe suffices


def test_probe_reports_a_linear_and_an_mlp_decoder():
    """An action that is not a linear function of the latent (the sign of x0 * x1): the MLP probe
    finds it, the linear one cannot."""
    rng = np.random.default_rng(1)
    latents = np.zeros((1_000, 16), np.float32)
    latents[:, :2] = rng.uniform(-1, 1, (1_000, 2))
    actions = (latents[:, 0] * latents[:, 1] > 0).astype(np.int64)
    result = probe(latents, actions, labelled=600, held_out=400, steps=600)
    assert result["accuracy"] > 0.85 and result["linear_accuracy"] < 0.65, result


def test_decode_stage_sweeps_sizes_and_skips_done_ones(bc_run, capsys):
    from lapo_fast.stages.decode import train_decoders

    data, run = bc_run
    cfg = resolve(DecodeConfig, "smoke", {"labelled": (4, 8), "deploy": 8, "held_out": 10, "eval_episodes": 2})
    results = train_decoders(data, run, cfg, progress=False)
    assert sorted(results) == ["4", "8"] and all("mean_return" in r for r in results.values())
    assert load_decoder(RunDir(run).decoder(8)).net[-1].out_features == 15
    assert train_decoders(data, run, cfg, progress=False) == results  # nothing redone
    too_many = resolve(DecodeConfig, "smoke", {"labelled": (4, 8), "deploy": 8, "held_out": 10_000})
    with pytest.raises(ValueError, match="decode was trained with held_out=10; this run asks for held_out=10000"):
        train_decoders(data, run, too_many)  # results of other settings are there: refused, not mixed
    RunDir(run).results("decode").unlink()
    with pytest.raises(ValueError, match="fewer than held_out"):
        train_decoders(data, run, too_many)


# -- evaluation ---------------------------------------------------------------------------------

def test_normalisation_table_covers_every_game_with_known_anchors():
    assert set(RANDOM_RETURN) == set(EXPERT_RETURN) == set(GAMES)
    assert EXPERT_RETURN["starpilot"] == 66.99 and RANDOM_RETURN["starpilot"] == pytest.approx(1.53, abs=0.01)
    for g in GAMES:
        assert normalized_return(RANDOM_RETURN[g], g) == pytest.approx(0)
        assert normalized_return(EXPERT_RETURN[g], g) == pytest.approx(1)
    assert normalized_return(5.0, "starpilot", low=1.0, high=9.0) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        normalized_return(1.0, "starpilot", low=3.0, high=2.0)


def test_evaluate_counts_episodes_evenly_and_matches_the_engine():
    from lapo_fast.envs import ProcgenVecEnv

    act = lambda obs: np.full(len(obs), 4, np.int32)  # NOOP  # noqa: E731
    r = evaluate(act, "coinrun", episodes=4, num_envs=2, seed=3)
    assert r["episodes"] == 4 and r["normalized"] == pytest.approx(normalized_return(r["mean_return"], "coinrun"))
    assert evaluate(act, "coinrun", episodes=4, num_envs=2, seed=3)["returns"] == r["returns"]
    # The same episodes stepped by hand: each env's first two finished episodes.
    seen = [[], []]
    with ProcgenVecEnv("coinrun", 2, seed=3, distribution_mode="easy") as env:
        env.reset()
        while min(map(len, seen)) < 2:
            _, _, done, _, info = env.step(np.full(2, 4, np.int32))
            for i in np.flatnonzero(done):
                seen[i].append(float(info["final_return"][i]))
    assert r["returns"] == seen[0][:2] + seen[1][:2]


# -- config -------------------------------------------------------------------------------------

def test_resolve_run_applies_flags_and_rejects_contradictions(capsys):
    cfgs = resolve_run("smoke", ["--lam.steps", "7", "--finetune.no-normalize-rewards", "--decode.labelled", "2", "4",
                                 "--decode.deploy", "4", "--finetune.fc-ramp", "10", "20"])
    assert cfgs.lam.steps == 7 and cfgs.finetune.normalize_rewards is False
    assert cfgs.decode.labelled == (2, 4) and cfgs.finetune.fc_ramp == (10, 20)
    assert resolve_run("paper").demo.env_steps > resolve_run("paper").finetune.env_steps
    for bad, msg in ((["--lam.steps"], "not valid"), (["--nope.steps", "1"], "not valid"),
                     (["--lam.steps", "abc"], "not valid"), (["--decode.deploy", "3"], "not one of the swept sizes"),
                     (["--finetune.minibatches", "7"], "minibatches"), (["--finetune.fc-ramp", "1"], "not valid"),
                     (["--eval.distribution-mode", "weird"], "not valid")):
        with pytest.raises(ValueError, match=msg):
            resolve_run("smoke", bad)
    assert "'easy', 'hard', 'extreme', 'memory'" in capsys.readouterr().err  # a Literal: tyro lists its choices


def test_runs_saved_before_tuple_settings_still_load(tmp_path):
    """Run directories written when lists were comma strings (labelled '16,64', ramps '0,64') and
    before DecodeConfig.online load as today's typed configs, and resume under them."""
    import json

    run = RunDir(tmp_path)
    for stage, kind, config in (
            ("decode", "DecodeConfig", {**dataclasses.asdict(resolve(DecodeConfig, "smoke")), "labelled": "8,16"}),
            ("finetune", "FinetuneConfig", {**dataclasses.asdict(resolve(FinetuneConfig, "smoke")),
                                            "action_head_ramp": "0,64", "value_head_ramp": "0,64",
                                            "fc_ramp": "0,128"})):
        config.pop("online", None)
        run.stage(stage).mkdir(parents=True)
        run.config_path(stage).write_text(json.dumps({"config": config, "type": kind}))
    assert run.config("decode") == resolve(DecodeConfig, "smoke")
    assert run.config("finetune") == resolve(FinetuneConfig, "smoke")
    run.results("decode").write_text("{}")  # progress made: a resume must find its settings unchanged
    run.claim("decode", resolve(DecodeConfig, "smoke"))
    with pytest.raises(ValueError, match="held_out=8; this run asks for held_out=9"):
        run.claim("decode", resolve(DecodeConfig, "smoke", {"held_out": 9}))


def test_online_decoder_labels_windows_inside_episodes_only_and_across_rollouts():
    """Stage 3b's labels: the IDM's latent of (o_{t-1}, o_t, o_{t+1}) for t in 1..T-1, with a_t,
    and none whose window crosses an episode end (dones[t-1] or dones[t])."""
    from lapo_fast.models import LatentIDM
    from lapo_fast.latent import OnlineDecoder

    torch.manual_seed(0)
    T, N = 5, 2
    frames = torch.randint(0, 256, (N, T + 1, 64, 64, 3), dtype=torch.uint8)
    actions = torch.arange(T * N).view(T, N)
    dones = torch.zeros(T, N)
    dones[2, 1] = 1  # env 1's episode ends with step 2: its windows at t = 2 and 3 cross it
    idm = LatentIDM(impala_scale=1).eval()
    labels = OnlineDecoder(idm, resolve(FinetuneConfig, "smoke"), "cpu")
    labels.add(frames, actions, dones)
    hits = torch.nonzero(actions[:, :, None] == labels.actions[0], as_tuple=True)[:2]
    pairs = sorted(zip(*[x.tolist() for x in hits]))
    assert pairs == [(1, 0), (1, 1), (2, 0), (3, 0), (4, 0), (4, 1)]
    with torch.no_grad():
        t, n = 3, 0
        expected = idm(normalize(frames[n, t - 1:t + 2][None])).latent
    i = labels.actions[0].tolist().index(int(actions[t, n]))
    torch.testing.assert_close(labels.latents[0][i], expected[0], rtol=1e-4, atol=1e-5)

    # The next rollout's first transition is labelled, its o_{t-1} the last rollout's o_{T-1} (as the
    # reference's buffer spans rollouts); env 1's window crosses an end at its step 0.
    frames2 = torch.randint(0, 256, (N, T + 1, 64, 64, 3), dtype=torch.uint8)
    frames2[:, 0] = frames[:, -1]
    dones2 = torch.zeros(T, N)
    dones2[0, 1] = 1
    labels.add(frames2, actions + 100, dones2)
    hits = torch.nonzero((actions + 100)[:, :, None] == labels.actions[1], as_tuple=True)[:2]
    assert sorted(zip(*[x.tolist() for x in hits])) == [(0, 0), (1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (4, 0), (4, 1)]
    with torch.no_grad():
        window = torch.cat([frames[0, -2:], frames2[0, 1:2]])[None]
        expected = idm(normalize(window)).latent
    i = labels.actions[1].tolist().index(100 + int(actions[0, 0]))
    torch.testing.assert_close(labels.latents[1][i], expected[0], rtol=1e-4, atol=1e-5)


def test_the_paper_presets_demonstrator_is_the_papers_50m_step_expert():
    assert resolve_run("paper").demo.env_steps == 50_000_000
    assert resolve_run("paper").finetune.env_steps == 4_000_000


@pytest.mark.parametrize("hidden", [(), (64,), (32, 16)])
def test_a_decoder_is_rebuilt_from_the_shape_saved_with_it(tmp_path, hidden):
    from safetensors.torch import save_file

    from lapo_fast.latent import save_decoder
    from lapo_fast.models import ActionDecoder

    torch.manual_seed(0)
    decoder = ActionDecoder(24, 7, hidden)
    x = torch.randn(5, 24)
    save_decoder(tmp_path / "d.safetensors", decoder)
    loaded = load_decoder(tmp_path / "d.safetensors")
    assert (loaded.latent_dim, loaded.num_actions, loaded.hidden) == (24, 7, hidden)
    torch.testing.assert_close(loaded(x), decoder(x))
    # A file from before the shape was stored: the shape read off its weights.
    save_file(decoder.state_dict(), str(tmp_path / "old.safetensors"))
    torch.testing.assert_close(load_decoder(tmp_path / "old.safetensors")(x), decoder(x))
    with pytest.raises(FileNotFoundError, match="lapo-fast decode"):
        load_decoder(tmp_path / "missing.safetensors")
