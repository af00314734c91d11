"""ProcgenVecEnv: many Procgen envs stepped in parallel by lapo_fast's C++ engine.

The envs are split into libenv instances of `envs_per_instance` envs each; instance j is exactly
procgen's own ``ProcgenGym3Env(num=sizes[j], rand_seed=instance_seeds[j], ...)`` (same game,
options and seed give bit-identical frames), and our thread pool steps the instances in parallel.
The split depends only on ``num_envs`` and ``envs_per_instance``, never on the thread count, so
results are the same with any number of threads.

Observations, rewards and flags live in preallocated buffers shared with the engine: ``step``
returns views of them (no copies), overwritten by the next ``step``. Copy what you keep.
Episodes reset automatically, in the step where they end, as in gym3: ``terminated[i]`` is True,
``obs[i]`` is already the new episode's first frame, and ``reward[i]`` is the old episode's last
reward. Procgen does not tell time limits from other episode ends, so ``truncated`` is all False.
"""

from __future__ import annotations

import importlib.util
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from lapo_fast.machine import available_cpus

from .games import DEFAULT_DISTRIBUTION_MODE, DISTRIBUTION_MODES, NUM_ACTIONS, OBS_SHAPE, check_game, check_mode

ActionsLike = Any  # numpy or torch integer array of shape (num_envs,)


def procgen_paths() -> tuple[str, str]:
    """(libenv.so path, assets dir) of the installed procgen-mirror, without importing procgen."""
    spec = importlib.util.find_spec("procgen")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "procgen is not installed: pip install procgen-mirror==0.10.7 (the cp311 build of procgen)"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    lib = root / "data" / "prebuilt" / "libenv.so"
    assets = root / "data" / "assets"
    if not lib.exists() or not assets.is_dir():
        raise ImportError(f"procgen at {root} has no prebuilt libenv.so/assets; reinstall procgen-mirror==0.10.7")
    return str(lib), str(assets) + os.sep


def instance_seeds(seed: int, count: int) -> list[int]:
    """The libenv rand_seed of each instance: independent streams derived from one seed."""
    state = np.random.SeedSequence(seed).generate_state(count, dtype=np.uint32)
    return [int(s & 0x7FFFFFFF) for s in state]


def _split(num_envs: int, per_instance: int) -> list[int]:
    full, rest = divmod(num_envs, per_instance)
    return [per_instance] * full + ([rest] if rest else [])


ENV_BYTES = 370 * 1024  # about what one Procgen env holds in memory (libenv state and buffers)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _available_memory() -> int:
    """Bytes of memory available to new allocations (0 when unknown)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


class ProcgenVecEnv(VectorEnv):
    """N Procgen envs (one game, or a mix) stepped in parallel: a gymnasium VectorEnv (its spaces
    declared, autoreset in the same step, as gym3: metadata["autoreset_mode"] is SAME_STEP; procgen
    does not keep the last frame of an episode, so there is no info["final_obs"])."""

    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP, "render_modes": []}
    single_observation_space = spaces.Box(0, 255, OBS_SHAPE, np.uint8)
    single_action_space = spaces.Discrete(NUM_ACTIONS)

    def __init__(
        self,
        env_name: str | Sequence[str],
        num_envs: int,
        *,
        seed: int | None = None,
        distribution_mode: str = DEFAULT_DISTRIBUTION_MODE,
        num_levels: int = 0,
        start_level: int = 0,
        use_sequential_levels: bool = False,
        paint_vel_info: bool = False,
        center_agent: bool = True,
        use_backgrounds: bool = True,
        restrict_themes: bool = False,
        use_monochrome_assets: bool = False,
        num_threads: int | None = None,
        envs_per_instance: int = 4,
        pin_memory: bool = False,
    ):
        if not _is_int(num_envs) or num_envs < 1:
            raise ValueError(f"num_envs must be a positive int, got {num_envs!r}")
        need, available = num_envs * ENV_BYTES, _available_memory()
        if available and need > 0.8 * available:
            raise ValueError(f"num_envs={num_envs} needs about {need / 2**30:.1f} GiB (~{ENV_BYTES // 1024} KiB per "
                             f"env), and {available / 2**30:.1f} GiB of memory are available: use fewer envs")
        games = [env_name] if isinstance(env_name, str) else list(env_name)
        if not games:
            raise ValueError("env_name must name at least one game")
        if num_envs % len(games):
            raise ValueError(f"num_envs={num_envs} must be a multiple of the number of games ({len(games)})")
        for g in games:
            check_game(g)
            check_mode(g, distribution_mode)
        for name, value in (("num_levels", num_levels), ("start_level", start_level)):
            if not _is_int(value) or not 0 <= value < 2**31:
                raise ValueError(f"{name} must be an int in [0, 2**31), got {value!r}")
        if not _is_int(envs_per_instance) or envs_per_instance < 1:
            raise ValueError(f"envs_per_instance must be a positive int, got {envs_per_instance!r}")
        if num_threads is None:
            num_threads = available_cpus()
        if not _is_int(num_threads) or num_threads < 1:
            raise ValueError(f"num_threads must be a positive int, got {num_threads!r}")
        # A thread steps whole libenv instances: more threads than instances would only idle.
        num_threads = min(int(num_threads), -(-int(num_envs) // int(envs_per_instance)))

        self.num_envs = int(num_envs)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self.games = games
        self.num_threads = num_threads
        self.envs_per_instance = envs_per_instance
        self.single_action_space_n = NUM_ACTIONS
        self.options: dict[str, bool | int | str] = {
            "num_levels": int(num_levels),
            "start_level": int(start_level),
            "use_sequential_levels": bool(use_sequential_levels),
            "distribution_mode": DISTRIBUTION_MODES[distribution_mode],
            "paint_vel_info": bool(paint_vel_info),
            "center_agent": bool(center_agent),
            "use_backgrounds": bool(use_backgrounds),
            "restrict_themes": bool(restrict_themes),
            "use_monochrome_assets": bool(use_monochrome_assets),
            "use_generated_assets": False,
            "num_actions": NUM_ACTIONS,
            "debug_mode": 0,
            "render_human": False,
        }
        self._lib_path, assets = procgen_paths()
        self.options["resource_root"] = assets
        self._alloc_buffers(pin_memory)
        self._pending_copy = None  # a CUDA event after an asynchronous copy out of self.obs
        self._engine = None
        self._build(random.SystemRandom().randrange(2**31) if seed is None else seed)

    # -- set-up -------------------------------------------------------------------------------

    def _alloc_buffers(self, pin_memory: bool) -> None:
        n = self.num_envs
        if pin_memory:
            import torch

            if not torch.cuda.is_available():
                raise RuntimeError("pin_memory=True needs CUDA; none is available here")
            self.obs = torch.empty((n, *OBS_SHAPE), dtype=torch.uint8, pin_memory=True).numpy()
        else:
            self.obs = np.zeros((n, *OBS_SHAPE), dtype=np.uint8)
        self.reward = np.zeros(n, np.float32)
        self.terminated = np.zeros(n, np.bool_)
        self.truncated = np.zeros(n, np.bool_)
        self._actions = np.zeros(n, np.int32)
        self.episode_return = np.zeros(n, np.float32)
        self.episode_length = np.zeros(n, np.int32)
        self.final_return = np.zeros(n, np.float32)
        self.final_length = np.zeros(n, np.int32)

    def _build(self, seed: int) -> None:
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        from lapo_fast import _C

        if self._engine is not None:
            self._engine.close()
        self.seed = int(seed)
        per_game = self.num_envs // len(self.games)
        self.instance_games: list[str] = []
        self.instance_sizes: list[int] = []
        for g in self.games:
            sizes = _split(per_game, self.envs_per_instance)
            self.instance_games += [g] * len(sizes)
            self.instance_sizes += sizes
        self.instance_seeds = instance_seeds(self.seed, len(self.instance_sizes))
        buffers = {
            "obs": self.obs, "reward": self.reward, "first": self.terminated.view(np.uint8),
            "actions": self._actions, "episode_return": self.episode_return,
            "episode_length": self.episode_length, "final_return": self.final_return,
            "final_length": self.final_length,
        }
        self._pid = os.getpid()
        self._engine = _C.ProcgenEngine(
            self._lib_path, self.instance_games, self.instance_sizes, self.instance_seeds,
            list(self.options.items()), self.num_threads, buffers,
        )
        self._stepped = False

    # -- gymnasium-style API ------------------------------------------------------------------

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Starts new episodes everywhere. With a seed, the level streams restart from it."""
        self._check_open()
        self._wait_for_copies()
        if options:
            raise ValueError(f"reset options are not supported, got {sorted(options)}")
        if seed is not None:
            self._build(seed)
        elif self._stepped:
            self._engine.force_reset()
            self._stepped = False
        self.terminated[:] = False
        return self.obs, self._info()

    def step(self, actions: ActionsLike, *, record_obs: np.ndarray | None = None):
        """Steps all envs; returns (obs, reward, terminated, truncated, info) as shared views.

        ``record_obs``, if given, receives (copied by the worker threads) the observations the
        actions were taken on, before the step.
        """
        self._check_open()
        self._set_actions(actions)
        self._wait_for_copies()
        self._engine.step(record_obs)
        self._stepped = True
        return self.obs, self.reward, self.terminated, self.truncated, self._info()

    def rollout(
        self,
        num_steps: int,
        policy: Callable[[np.ndarray], ActionsLike] | None = None,
        *,
        actions: ActionsLike | None = None,
        out: np.ndarray | None = None,
    ) -> dict[str, np.ndarray]:
        """Runs `num_steps` steps, writing each step's observation straight into a (T,N,64,64,3)
        buffer (``out`` if given). Actions come from ``policy(obs)`` or a (T,N) ``actions`` array.

        Returns obs[t] (what action[t] was taken on), actions, rewards, terminated (T,N), and the
        finished episodes' returns/lengths (T,N; 0 where none ended).
        """
        self._check_open()
        if (policy is None) == (actions is None):
            raise ValueError("rollout needs exactly one of policy or actions")
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
        n = self.num_envs
        if actions is not None:
            actions = _to_numpy(actions)
            if actions.shape != (num_steps, n):
                raise ValueError(f"actions must have shape {(num_steps, n)}, got {actions.shape}")
        if out is None:
            out = np.empty((num_steps, n, *OBS_SHAPE), np.uint8)
        elif out.shape != (num_steps, n, *OBS_SHAPE) or out.dtype != np.uint8 or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous uint8 array of shape {(num_steps, n, *OBS_SHAPE)}")
        result = {
            "obs": out,
            "actions": np.empty((num_steps, n), np.int32),
            "rewards": np.empty((num_steps, n), np.float32),
            "terminated": np.empty((num_steps, n), np.bool_),
            "final_return": np.empty((num_steps, n), np.float32),
            "final_length": np.empty((num_steps, n), np.int32),
        }
        for t in range(num_steps):
            a = actions[t] if actions is not None else policy(self.obs)
            self._set_actions(a)
            self._wait_for_copies()  # the policy may have copied obs to a GPU
            result["actions"][t] = self._actions
            self._engine.step(out[t])
            self._stepped = True
            result["rewards"][t] = self.reward
            result["terminated"][t] = self.terminated
            result["final_return"][t] = self.final_return
            result["final_length"][t] = self.final_length
        return result

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()

    @property
    def closed(self) -> bool:
        return self._engine is None or self._engine.closed

    def obs_tensor(self):
        """The observation buffer as a torch tensor sharing its memory (no copy): the next step
        overwrites it. To move it to a GPU use obs_to, which makes that safe."""
        import torch

        return torch.from_numpy(self.obs)

    def obs_to(self, device):
        """The observations on `device`. From pinned memory (pin_memory=True) the copy runs
        asynchronously; the next step, reset or rollout waits for it before the workers overwrite
        the buffer, so the copy never reads a half-written step."""
        import torch

        device = torch.device(device)
        src = torch.from_numpy(self.obs)
        if device.type != "cuda":
            return src.clone()
        out = src.to(device, non_blocking=True)
        self._pending_copy = torch.cuda.Event()
        self._pending_copy.record(torch.cuda.current_stream(device))
        return out

    def _wait_for_copies(self) -> None:
        if self._pending_copy is not None:
            self._pending_copy.synchronize()
            self._pending_copy = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.close()

    def __repr__(self) -> str:
        return (f"ProcgenVecEnv(games={self.games}, num_envs={self.num_envs}, "
                f"num_threads={self.num_threads}, instances={len(self.instance_sizes)})")

    # -- helpers ------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("this ProcgenVecEnv is closed")
        if os.getpid() != self._pid:  # a forked child has the engine's memory but not its threads
            raise RuntimeError("this ProcgenVecEnv was created in another process (before a fork); "
                               "create envs in the process that steps them")

    def _set_actions(self, actions: ActionsLike) -> None:
        a = _to_numpy(actions)
        if a.shape != (self.num_envs,):
            raise ValueError(f"actions must have shape ({self.num_envs},), got {a.shape}")
        if a.dtype.kind not in "iu":
            raise TypeError(f"actions must be integers, got dtype {a.dtype}")
        if a.size and (a.min() < 0 or a.max() >= NUM_ACTIONS):
            bad = int(np.flatnonzero((a < 0) | (a >= NUM_ACTIONS))[0])
            raise ValueError(f"action {int(a[bad])} for env {bad} is outside [0, {NUM_ACTIONS})")
        np.copyto(self._actions, a, casting="unsafe")

    def _info(self) -> dict[str, Any]:
        info: dict[str, Any] = dict(self._engine.info())
        info["episode_return"] = self.episode_return
        info["episode_length"] = self.episode_length
        info["final_return"] = self.final_return
        info["final_length"] = self.final_length
        return info


def _to_numpy(x: ActionsLike) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, on any device
        return x.detach().cpu().numpy()
    return np.asarray(x)
