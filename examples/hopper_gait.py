"""Does a saved `sac_imagined.py` Hopper-v5 agent hop, or stand still until the time limit? A return near 1,000
with no spread is often a Hopper that keeps its balance and collects the healthy reward; this says which.

    python examples/hopper_gait.py runs/<Hopper-v5 run>/agent.pt [--episodes 5]

For each deterministic episode (the actor's tanh of the mean, as the evaluations act; reset seeds 10,000 on): the
return, the length and how it ended, how far the torso moved (`qpos[0]`), the mean `info["x_velocity"]`, the share
of steps with no contact between the body and the floor, and the number of take-offs (contact, then none).
For agents whose policy sees the real observation (the ensembles' runs and `--world-model none`).
"""
import argparse
import os
import sys

import gymnasium as gym
import mujoco
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rl_utils as ru  # noqa: E402
from sac_imagined import Actor, policy_fn  # noqa: E402


def gait(agent_path, episodes=5, first_seed=10_000):
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
    rows = []
    for episode in range(episodes):
        obs, _ = env.reset(seed=first_seed + episode)
        x0, ret, velocities, airborne = float(data.qpos[0]), 0.0, [], []
        while True:
            obs, reward, terminated, truncated, info = env.step(act(obs[None])[0])
            ret += float(reward)
            velocities.append(info["x_velocity"])
            airborne.append(not any(floor in (data.contact[i].geom1, data.contact[i].geom2) for i in range(data.ncon)))
            if terminated or truncated:
                break
        air = np.array(airborne)
        rows.append({"return": ret, "length": len(air), "ended": "terminated" if terminated else "truncated",
                     "x_displacement": float(data.qpos[0]) - x0, "x_velocity": float(np.mean(velocities)),
                     "airborne": float(air.mean()), "take_offs": int(np.sum(air[1:] & ~air[:-1]))})
    env.close()
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("agent_path")
    parser.add_argument("--episodes", type=int, default=5)
    cli = parser.parse_args()
    for i, row in enumerate(gait(cli.agent_path, cli.episodes)):
        print(f"episode {i}: return {row['return']:.1f}, {row['length']} steps ({row['ended']}), torso moved "
              f"{row['x_displacement']:.2f} m, mean x_velocity {row['x_velocity']:.3f} m/s, airborne "
              f"{row['airborne']:.2f} of the steps, {row['take_offs']} take-offs")
