"""Does a saved `sac_imagined.py` / `svg_imagined.py` Hopper-v5 agent hop, or stand still until the time limit? A
return near 1,000 with no spread is often a Hopper that keeps its balance and collects the healthy reward; this says
which.

    python examples/hopper_gait.py runs/<Hopper-v5 run>/agent.pt [--episodes 5] [--foresight] [--critics]

For each deterministic episode (the actor's tanh of the mean, as the evaluations act; reset seeds 10,000 on): the
return, the length and how it ended, how far the torso moved (`qpos[0]`), the mean `info["x_velocity"]`, the share
of steps with no contact between the body and the floor, and the number of take-offs (contact, then none).
For agents whose policy sees the real observation (the ensembles' runs and `--world-model none`).

With `--foresight`, for each episode that terminated (the Hopper fell), the run's world model (the world_model.pt
beside the agent) is asked whether it saw the fall coming: from the real state k steps before the fall (k in
FORESIGHT_STEPS), FORESIGHT_ROWS imagined rows (a random member per row and step, the known or learned termination
rule) follow the same deterministic policy for k steps; the share of rows that terminate within them. A share near
1 far ahead: the model saw the fall and the policy did not avoid it (a value, horizon or optimisation matter); near 0
up to the last steps: the model did not see it (a model matter).

With `--critics`, the run's critics' mean Q(s, a) of the states and actions of each fall's episode at its start and
at CRITIC_STEPS steps before the fall, in return units (a `--scaled-critics` run's outputs read through the bounds
its agent.pt keeps; an older agent.pt without them gives the raw outputs, -1 and +1 its lower and upper bound). A
value that sinks long before the fall: the critics saw it coming.
"""
import argparse
import os
import sys

import gymnasium as gym
import mujoco
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dyna  # noqa: E402
import rl_utils as ru  # noqa: E402
from sac_imagined import Actor, SoftQNetworks, branched_rollouts, policy_fn  # noqa: E402
from svg_imagined import in_bound_units  # noqa: E402

FORESIGHT_STEPS = (30, 20, 10, 5)
FORESIGHT_ROWS = 64
CRITIC_STEPS = (200, 100, 60, 30, 10, 1)


def fall_foresight(model, act, start_obs, steps, seed=0):
    """The share of FORESIGHT_ROWS imagined rows from start_obs (d,) that terminate within `steps` model steps of
    the deterministic policy `act` (the model's imagined vector env: a random member per row and step). Each row
    ends at most once in the branched rollouts, so their terminated transitions count the rows that fell."""
    envs = model.imagined_vector_env(FORESIGHT_ROWS, seed=seed, horizon=steps, start="buffer")
    rollouts = branched_rollouts(envs, act, np.repeat(start_obs[None], FORESIGHT_ROWS, 0), seed, steps)
    envs.close()
    return float(rollouts["terminated"].sum()) / FORESIGHT_ROWS


def gait(agent_path, episodes=5, first_seed=10_000, foresight=False, critics=False):
    if isinstance(episodes, bool) or not isinstance(episodes, int) or episodes < 1:
        raise SystemExit(f"hopper_gait.py: --episodes expected an integer >= 1, got {episodes!r}")
    if not os.path.isfile(agent_path):
        raise SystemExit(f"hopper_gait.py: expected the agent.pt a sac_imagined.py run wrote (runs/<run>/agent.pt), "
                         f"got {agent_path!r}: the file does not exist")
    payload = ru.load_agent(agent_path)
    if payload["args"]["env_id"] != "Hopper-v5":
        raise SystemExit(f"hopper_gait.py: {agent_path} is a {payload['args']['env_id']} agent, expected Hopper-v5")
    env = gym.make("Hopper-v5")
    model, data = env.unwrapped.model, env.unwrapped.data
    floor = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_GEOM, "floor")
    actor = Actor.from_run_args(payload["args"], env.observation_space.shape[0], env.action_space)
    actor.load_state_dict(payload["state_dicts"]["actor"])
    act = policy_fn(actor, "cpu", deterministic=True)  # as the evaluations act
    world = None  # the run's world model, with --foresight
    if foresight:
        if payload["args"].get("world_model", "none") == "none" or not payload.get("world_model_path"):
            raise SystemExit(f"hopper_gait.py: --foresight needs a run with a world model (its world_model.pt); "
                             f"{agent_path} records none (world_model {payload['args'].get('world_model')!r})")
        try:
            world = dyna.agent_world_model(payload, agent_path)
        except ru.ArgError as e:
            raise SystemExit(f"hopper_gait.py: --foresight needs the run's world model: {e}") from None
    qf = None
    if critics:
        if "qf" not in payload["state_dicts"]:
            raise SystemExit(f"hopper_gait.py: --critics needs an agent.pt with its critics ('qf'); {agent_path} has "
                             f"{sorted(payload['state_dicts'])}")
        qf = SoftQNetworks.from_run_args(payload["args"], env.observation_space.shape[0], env.action_space.shape[0])
        qf.load_state_dict(payload["state_dicts"]["qf"])
        qf.eval()
        bounds = payload.get("extra", {}).get("critic_bounds") if payload["args"].get("scaled_critics") else None
        bounds = None if bounds is None or None in bounds else torch.tensor(bounds)  # non-finite: saved as None
    rows = []
    for episode in range(episodes):
        obs, _ = env.reset(seed=first_seed + episode)
        x0, ret, velocities, airborne, states, actions = float(data.qpos[0]), 0.0, [], [], [obs], []
        while True:
            actions.append(act(obs[None])[0])
            obs, reward, terminated, truncated, info = env.step(actions[-1])
            ret += float(reward)
            velocities.append(info["x_velocity"])
            airborne.append(not any(floor in (data.contact[i].geom1, data.contact[i].geom2) for i in range(data.ncon)))
            states.append(obs)
            if terminated or truncated:
                break
        air = np.array(airborne)
        rows.append({"return": ret, "length": len(air), "ended": "terminated" if terminated else "truncated",
                     "x_displacement": float(data.qpos[0]) - x0, "x_velocity": float(np.mean(velocities)),
                     "airborne": float(air.mean()), "take_offs": int(np.sum(air[1:] & ~air[:-1]))})
        if world is not None and terminated:
            rows[-1]["foresight"] = {k: fall_foresight(world, act, states[-1 - k], k, seed=first_seed + episode)
                                     for k in FORESIGHT_STEPS if k < len(states)}
        if qf is not None and terminated:
            with torch.no_grad():
                q = in_bound_units(qf(torch.as_tensor(np.array(states[:-1]), dtype=torch.float32),
                                      torch.as_tensor(np.array(actions), dtype=torch.float32)), bounds).mean(0).numpy()
            rows[-1]["critics"] = {"start": float(q[0]), **{k: float(q[-k]) for k in CRITIC_STEPS if k <= len(q)}}
    env.close()
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("?")[0].split()) + "?")
    parser.add_argument("agent_path")
    parser.add_argument("--episodes", type=int, default=5)
    parser.add_argument("--foresight", action="store_true",
                        help="for each fall, the share of imagined rows that fall within k steps of the real state "
                             f"k steps before it, k = {' / '.join(map(str, FORESIGHT_STEPS))} (needs the run's "
                             "world_model.pt)")
    parser.add_argument("--critics", action="store_true",
                        help="for each fall, the critics' mean Q(s, a) at the episode's start and "
                             f"{' / '.join(map(str, CRITIC_STEPS))} steps before it")
    cli = parser.parse_args()
    for i, row in enumerate(gait(cli.agent_path, cli.episodes, foresight=cli.foresight, critics=cli.critics)):
        seen = row.get("foresight")
        seen = f"; imagined rows that fall within {' / '.join(map(str, seen))} steps of the state that many " \
               f"before the fall: {' / '.join(f'{v:.0%}' for v in seen.values())}" if seen else ""
        q = row.get("critics")
        seen += f"; the critics' Q at the start and {' / '.join(map(str, list(q)[1:]))} steps before the fall: " \
                f"{' / '.join(f'{v:+.4g}' for v in q.values())}" if q else ""
        print(f"episode {i}: return {row['return']:.1f}, {row['length']} steps ({row['ended']}), torso moved "
              f"{row['x_displacement']:.2f} m, mean x_velocity {row['x_velocity']:.3f} m/s, airborne "
              f"{row['airborne']:.2f} of the steps, {row['take_offs']} take-offs{seen}")
