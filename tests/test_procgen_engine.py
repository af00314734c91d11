"""ProcgenVecEnv against procgen's own gym3 env, plus determinism, stats and bad input."""

import numpy as np
import pytest
import torch

from lapo_fast.envs import GAMES, ProcgenVecEnv

gym3_procgen = pytest.importorskip("procgen")


def gym3_twins(env: ProcgenVecEnv, **kwargs):
    """procgen's ProcgenGym3Env for each of our libenv instances, same game, options and seed."""
    return [
        gym3_procgen.ProcgenGym3Env(num=size, env_name=game, rand_seed=seed, **kwargs)
        for game, size, seed in zip(env.instance_games, env.instance_sizes, env.instance_seeds)
    ]


def gym3_observe(twins):
    parts = [t.observe() for t in twins]
    rew = np.concatenate([p[0] for p in parts])
    obs = np.concatenate([p[1]["rgb"] for p in parts])
    first = np.concatenate([p[2] for p in parts])
    return obs, rew, first


def gym3_act(twins, actions):
    i = 0
    for t in twins:
        t.act(actions[i : i + t.num])
        i += t.num


CASES = [
    # (games, num_envs, our kwargs, gym3 kwargs)
    ("starpilot", 16, {"distribution_mode": "hard"}, {"distribution_mode": "hard"}),
    (
        "ninja", 12,
        dict(distribution_mode="easy", num_levels=20, start_level=7, paint_vel_info=True,
             use_backgrounds=False, restrict_themes=True, use_monochrome_assets=True,
             center_agent=False, envs_per_instance=5),
        dict(distribution_mode="easy", num_levels=20, start_level=7, paint_vel_info=True,
             use_backgrounds=False, restrict_themes=True, use_monochrome_assets=True,
             center_agent=False),
    ),
    ("maze", 8, {"distribution_mode": "memory", "use_sequential_levels": True, "num_levels": 3},
     {"distribution_mode": "memory", "use_sequential_levels": True, "num_levels": 3}),
]


@pytest.mark.parametrize("game,n,ours,theirs", CASES, ids=[c[0] for c in CASES])
def test_bit_identical_to_gym3(game, n, ours, theirs):
    env = ProcgenVecEnv(game, n, seed=2024, num_threads=2, **ours)
    twins = gym3_twins(env, **theirs)
    obs, _ = env.reset()
    np.testing.assert_array_equal(obs, gym3_observe(twins)[0])
    rng = np.random.default_rng(0)
    ends = 0
    for step in range(1500):
        actions = rng.integers(0, 15, n, dtype=np.int32)
        obs, rew, term, trunc, info = env.step(actions)
        gym3_act(twins, actions)
        g_obs, g_rew, g_first = gym3_observe(twins)
        assert np.array_equal(obs, g_obs), f"obs differ at step {step}"
        assert np.array_equal(rew, g_rew), f"rewards differ at step {step}"
        assert np.array_equal(term, g_first), f"dones differ at step {step}"
        assert not trunc.any()
        ends += int(term.sum())
    assert ends >= 20, "the comparison should cover many episode ends"
    env.close()


def test_mixed_games_match_gym3():
    env = ProcgenVecEnv(["starpilot", "coinrun"], 8, seed=5, envs_per_instance=3)  # the default mode: easy
    assert env.instance_games == ["starpilot", "starpilot", "coinrun", "coinrun"]
    twins = gym3_twins(env, distribution_mode="easy")
    rng = np.random.default_rng(1)
    for _ in range(300):
        a = rng.integers(0, 15, 8, dtype=np.int32)
        obs, rew, term, *_ = env.step(a)
        gym3_act(twins, a)
        g_obs, g_rew, g_first = gym3_observe(twins)
        assert np.array_equal(obs, g_obs) and np.array_equal(rew, g_rew) and np.array_equal(term, g_first)


def _trajectory(num_threads, seed=11, steps=400):
    env = ProcgenVecEnv("starpilot", 24, seed=seed, num_threads=num_threads)
    actions = np.random.default_rng(3).integers(0, 15, (steps, 24), dtype=np.int32)
    out = env.rollout(steps, actions=actions)
    env.close()
    return out


@pytest.mark.parametrize("threads", [1, 3])
def test_deterministic_across_thread_counts_and_runs(threads):
    ref = _trajectory(2)
    other = _trajectory(threads)
    for key in ref:
        np.testing.assert_array_equal(ref[key], other[key], err_msg=key)
    different_seed = _trajectory(2, seed=12)
    assert not np.array_equal(ref["obs"], different_seed["obs"])


def test_every_game_steps():
    for game in GAMES:
        env = ProcgenVecEnv(game, 4, seed=0, num_threads=2)
        first_obs = env.obs.copy()
        for _ in range(20):
            obs, rew, *_ = env.step(np.full(4, 7, np.int32))
        assert obs.shape == (4, 64, 64, 3) and obs.dtype == np.uint8
        assert first_obs.any() and not np.array_equal(first_obs, obs), game
        env.close()


def test_episode_statistics_computed_in_cpp_match_python():
    env = ProcgenVecEnv("starpilot", 8, seed=9)
    running = np.zeros(8)
    length = np.zeros(8, int)
    finished = []
    rng = np.random.default_rng(4)
    for _ in range(800):
        _, rew, term, _, info = env.step(rng.integers(0, 15, 8))
        running += rew
        length += 1
        for i in np.flatnonzero(term):
            assert info["final_return"][i] == pytest.approx(running[i], abs=1e-4)
            assert info["final_length"][i] == length[i]
            finished.append(running[i])
            running[i] = 0
            length[i] = 0
        assert (info["final_length"][~term] == 0).all()
        np.testing.assert_allclose(info["episode_return"], running, atol=1e-4)
        np.testing.assert_array_equal(info["episode_length"], length)
    assert len(finished) > 10 and max(finished) > 0


def test_reset_with_seed_replays_and_plain_reset_starts_new_episodes():
    env = ProcgenVecEnv("starpilot", 6, seed=1)
    acts = np.random.default_rng(0).integers(0, 15, (50, 6))
    a = env.rollout(50, actions=acts)
    obs0, _ = env.reset(seed=1)
    b = env.rollout(50, actions=acts)
    np.testing.assert_array_equal(a["obs"], b["obs"])
    obs, info = env.reset()
    assert not env.terminated.any()
    assert (info["episode_length"] == 0).all() and (info["episode_return"] == 0).all()
    # A plain reset abandons the episodes and draws new levels; a seeded one replays them.
    assert not np.array_equal(info["level_seed"], env.reset(seed=1)[1]["level_seed"])
    with pytest.raises(ValueError, match="options"):
        env.reset(options={"foo": 1})


def test_rollout_records_the_observation_each_action_saw():
    env_a = ProcgenVecEnv("starpilot", 5, seed=3)
    env_b = ProcgenVecEnv("starpilot", 5, seed=3)
    acts = np.random.default_rng(2).integers(0, 15, (40, 5))
    out = env_a.rollout(40, actions=acts)
    for t in range(40):
        np.testing.assert_array_equal(out["obs"][t], env_b.obs)
        _, rew, term, *_ = env_b.step(acts[t])
        np.testing.assert_array_equal(out["rewards"][t], rew)
        np.testing.assert_array_equal(out["terminated"][t], term)
    np.testing.assert_array_equal(env_a.obs, env_b.obs)
    # A policy callable and torch actions work too, and the buffer is shared with torch.
    seen = []
    res = env_a.rollout(3, lambda o: (seen.append(o.copy()), torch.full((5,), 4))[1])
    assert (res["actions"] == 4).all()
    np.testing.assert_array_equal(res["obs"][0], seen[0])
    assert env_a.obs_tensor().data_ptr() == env_a.obs.ctypes.data


def test_step_record_obs():
    env = ProcgenVecEnv("starpilot", 4, seed=0)
    before = env.obs.copy()
    rec = np.zeros_like(env.obs)
    env.step(np.zeros(4, np.int64), record_obs=rec)
    np.testing.assert_array_equal(rec, before)
    with pytest.raises(ValueError, match="elements"):
        env.step(np.zeros(4, np.int32), record_obs=np.zeros((3, 64, 64, 3), np.uint8))


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(env_name="nosuchgame"), ValueError, "unknown Procgen game"),
        (dict(distribution_mode="extreme", env_name="ninja"), ValueError, "no 'extreme'"),
        (dict(distribution_mode="insane"), ValueError, "unknown distribution_mode"),
        (dict(num_envs=0), ValueError, "num_envs"),
        (dict(num_levels=-1), ValueError, "num_levels"),
        (dict(num_threads=0), ValueError, "num_threads"),
        (dict(env_name=["starpilot", "ninja"], num_envs=3), ValueError, "multiple"),
        (dict(seed=-5), ValueError, "seed"),
    ],
)
def test_bad_construction_raises(kwargs, exc, match):
    args = dict(env_name="starpilot", num_envs=4)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        ProcgenVecEnv(**args)


def test_bad_actions_raise_and_leave_env_usable():
    env = ProcgenVecEnv("starpilot", 4, seed=0)
    with pytest.raises(ValueError, match="outside"):
        env.step(np.array([0, 1, 15, 2]))
    with pytest.raises(ValueError, match="outside"):
        env.step(torch.tensor([0, -1, 3, 2]))
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros(5, np.int32))
    with pytest.raises(TypeError, match="integers"):
        env.step(np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="exactly one"):
        env.rollout(3)
    env.step(np.zeros(4, np.int32))  # still fine
    env.close()
    with pytest.raises(RuntimeError, match="closed"):
        env.step(np.zeros(4, np.int32))
    with pytest.raises(RuntimeError, match="closed"):
        env.reset()
    env.close()  # idempotent


def test_engine_checks_buffers_itself():
    from lapo_fast import _C
    from lapo_fast.envs.procgen_vec import procgen_paths

    lib, _ = procgen_paths()
    options = list(ProcgenVecEnv("starpilot", 1).options.items())
    n = 2
    bufs = dict(obs=np.zeros((n, 64, 64, 3), np.uint8), reward=np.zeros(n, np.float64),
                first=np.zeros(n, np.uint8), actions=np.zeros(n, np.int32),
                episode_return=np.zeros(n, np.float32), episode_length=np.zeros(n, np.int32),
                final_return=np.zeros(n, np.float32), final_length=np.zeros(n, np.int32))
    with pytest.raises(TypeError, match="reward"):
        _C.ProcgenEngine(lib, ["starpilot"], [n], [0], options, 1, bufs)
    bufs["reward"] = np.zeros(n, np.float32)
    bufs["actions"][1] = 99
    eng = _C.ProcgenEngine(lib, ["starpilot"], [n], [0], options, 1, bufs)
    with pytest.raises(ValueError, match="env 1"):
        eng.step()
    with pytest.raises(RuntimeError, match="could not load"):
        _C.ProcgenEngine("/nonexistent/libenv.so", ["starpilot"], [n], [0], options, 1, bufs)


def test_env_used_in_a_forked_child_raises_instead_of_hanging():
    import multiprocessing as mp

    global _FORKED_ENV
    env = _FORKED_ENV = ProcgenVecEnv("starpilot", 4, seed=0, num_threads=2)
    env.step(np.zeros(4, np.int32))
    with mp.get_context("fork").Pool(1) as pool:  # the child inherits the env through memory
        message = pool.apply_async(_step_in_child).get(timeout=60)
    assert "another process" in message
    env.step(np.zeros(4, np.int32))  # the parent's env still works
    _FORKED_ENV = None


_FORKED_ENV = None


def _step_in_child():
    try:
        _FORKED_ENV.step(np.zeros(4, np.int32))
    except RuntimeError as e:
        return str(e)
    return "stepped"


def test_missing_procgen_is_a_clear_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "procgen" else real(name, *a))
    with pytest.raises(ImportError, match="procgen-mirror"):
        ProcgenVecEnv("starpilot", 2)


def test_an_async_copy_of_the_obs_is_waited_for_before_the_buffer_is_overwritten():
    """obs_to(cuda) from pinned memory is asynchronous; step, reset and rollout must wait for it
    (a recorded CUDA event, stood in for here) before the workers write the next frames."""
    order = []

    class Copy:
        def synchronize(self):
            order.append("waited")

    with ProcgenVecEnv("starpilot", 4, seed=1, num_threads=1) as env:
        env.reset()
        class Engine:  # the C++ engine, its step calls recorded
            def __init__(self, engine):
                self.engine = engine

            def step(self, *a):
                order.append("stepped")
                return self.engine.step(*a)

            def __getattr__(self, name):
                return getattr(self.engine, name)

        env._engine = Engine(env._engine)
        for call in (lambda: env.step(np.zeros(4, np.int32)),
                     lambda: env.rollout(2, actions=np.zeros((2, 4), np.int32))):
            order.clear()
            env._pending_copy = Copy()
            call()
            assert order[:2] == ["waited", "stepped"] and env._pending_copy is None
        copy = env.obs_to("cpu")
        env.step(np.zeros(4, np.int32))
        assert not np.shares_memory(copy.numpy(), env.obs)


def test_a_gymnasium_vector_env_that_gymnasiums_wrappers_wrap():
    import gymnasium
    from gymnasium.wrappers.vector import RecordEpisodeStatistics

    env = ProcgenVecEnv("coinrun", 4, seed=3)
    assert isinstance(env, gymnasium.vector.VectorEnv)
    assert env.metadata["autoreset_mode"] == gymnasium.vector.AutoresetMode.SAME_STEP
    assert env.single_action_space == gymnasium.spaces.Discrete(15)
    assert env.observation_space.shape == (4, 64, 64, 3) and env.action_space.shape == (4,)
    wrapped = RecordEpisodeStatistics(env)
    obs, _ = wrapped.reset()
    assert env.observation_space.contains(obs)
    rng, ended = np.random.default_rng(0), 0
    for _ in range(400):
        obs, reward, done, truncated, info = wrapped.step(rng.integers(0, 15, 4))
        if done.any():  # gymnasium's episode statistics are the engine's own
            np.testing.assert_allclose(info["episode"]["r"][done], info["final_return"][done])
            np.testing.assert_array_equal(info["episode"]["l"][done], info["final_length"][done])
            ended += int(done.sum())
    assert ended > 0 and not truncated.any()
    wrapped.close()
