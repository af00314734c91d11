"""Procgen stepping throughput: lapo_fast's ProcgenVecEnv vs gym3's ProcgenGym3Env vs envpool.

All contenders step the same game in the same (hard) mode with the same uniform-random actions,
in this run, on this machine. Prints median env steps/s per contender and ours/theirs ratios.

    python benchmarks/env_step.py [--games starpilot ninja] [--envs 16 64 256] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import numpy as np

if __package__ in (None, ""):  # `python benchmarks/env_step.py`: the repository root on the path, not benchmarks/
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import dump_json, median_time, print_table

warnings.filterwarnings("ignore")


def make_ours(game, n, threads):
    from lapo_fast.envs import ProcgenVecEnv

    env = ProcgenVecEnv(game, n, seed=0, num_threads=threads, distribution_mode="hard")
    return lambda a: env.step(a), env.close


def make_gym3(game, n, threads):
    from procgen import ProcgenGym3Env

    env = ProcgenGym3Env(num=n, env_name=game, num_threads=threads, distribution_mode="hard", rand_seed=0)

    def step(a):
        env.act(a)
        return env.observe()

    return step, env.close


def make_envpool(game, n, threads, asynchronous):
    import envpool

    task = f"{game.capitalize()}Hard-v0"
    if not asynchronous:
        env = envpool.make(task, env_type="gymnasium", num_envs=n, batch_size=n, num_threads=threads, seed=0)
        env.reset()
        return lambda a: env.step(a), env.close
    # Async: twice the envs, receive whichever batch of n is ready first (envpool's fast mode).
    env = envpool.make(task, env_type="gymnasium", num_envs=2 * n, batch_size=n, num_threads=threads, seed=0)
    env.async_reset()
    state = {"ids": env.recv()[-1]["env_id"]}

    def step(a):
        env.send(a, state["ids"])
        out = env.recv()
        state["ids"] = out[-1]["env_id"]
        return out

    return step, env.close


def contenders(threads):
    yield "ours", lambda g, n: make_ours(g, n, threads)
    yield "ours 1 thread", lambda g, n: make_ours(g, n, 1)
    yield "gym3 threads=2", lambda g, n: make_gym3(g, n, 2)
    yield "gym3 default(4)", lambda g, n: make_gym3(g, n, 4)
    yield "envpool sync", lambda g, n: make_envpool(g, n, threads, False)
    yield "envpool async", lambda g, n: make_envpool(g, n, threads, True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--games", nargs="+", default=["starpilot", "ninja"])
    p.add_argument("--envs", nargs="+", type=int, default=[16, 64, 256])
    p.add_argument("--env-steps", type=int, default=40_000, help="env steps per timed repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--json", default=None, help="write results as JSON to this path ('-' for stdout)")
    args = p.parse_args()

    rows = []
    for game in args.games:
        for n in args.envs:
            steps = max(20, args.env_steps // n)
            actions = np.random.default_rng(0).integers(0, 15, (steps, n), dtype=np.int32)
            results = {}
            for name, make in contenders(args.threads):
                try:
                    step, close = make(game, n)
                except Exception as e:  # an anchor that is not installed is reported, not fatal
                    print(f"# {name} unavailable: {type(e).__name__}: {str(e).splitlines()[0]}", file=sys.stderr)
                    continue

                def run():
                    for t in range(steps):
                        step(actions[t])

                results[name] = steps * n / median_time(run, args.repeats)
                close()
            ours = results["ours"]
            for name, rate in results.items():
                rows.append({"game": game, "num_envs": n, "impl": name, "steps_per_s": rate,
                             "ours_over_it": ours / rate})
            gym3 = max((v for k, v in results.items() if k.startswith("gym3")), default=None)
            pool = max((v for k, v in results.items() if k.startswith("envpool")), default=None)
            print(f"{game:>10} N={n:<4} ours {ours:9.0f}/s   x{ours / gym3 if gym3 else float('nan'):.2f} gym3 best"
                  f"   x{ours / pool if pool else float('nan'):.2f} envpool best", flush=True)

    print()
    print_table(rows, [("game", "game", ""), ("num_envs", "N", "d"), ("impl", "implementation", ""),
                       ("steps_per_s", "steps/s (median)", ",.0f"), ("ours_over_it", "ours / it", ".2f")])
    if args.json:
        dump_json(args.json, {"benchmark": "env_step", "threads": args.threads, "rows": rows})


if __name__ == "__main__":
    main()
