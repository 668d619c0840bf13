"""A `WorldModelVectorEnv` step as one CUDA graph: the model, the env's bookkeeping and its checks in one launch.

`WorldModelVectorEnv.use_cuda_graph()` turns it on (torch output on a GPU, NEXT_STEP autoreset). On a GPU an
eager step is a few dozen small kernels launched one by one from Python, plus a host sync for the done flags and
the checks: below tens of thousands of rows the GPU waits for the host. Here one step is:

1. the actions copied into the graph's input buffer (the host checks their shape and dtype, no kernel);
2. the graph replayed: action range flag, `action_transform_fn`, `transition_fn` on the state buffers, the
   reward / flags / step counters with last step's finished rows cleared (NEXT_STEP), the done flags, one
   finiteness flag, the new state written back into the state buffers;
3. the *previous* step's verdict (finiteness, action range, done flags: copied to pinned host memory without
   blocking when that step ran) read on the host; by then the GPU is busy with this step, so it never waits;
4. the rows that finished last step reset eagerly (`reset_fn` on those rows only, written into the buffers);
5. fresh copies of the outputs returned (the caller owns them, as with the eager env).

The price of never waiting: a bad action or a non-finite value is raised at the step after the one that made
it (the env then needs a `reset()`), without the rows (`eager=True` or the plain env finds them). Discrete
indices are clamped into range for the model meanwhile, as in the eager env.

What a captured step needs from the adapters (the reference ensemble's meet it): tensor operations only on the
output device, no host read (`.item()`, `bool(tensor)`, `.cpu()`), the same shapes every step, the state a pytree
of tensors. A capture that fails says so and names `eager=True`, which runs the same buffers without a graph: on
any device, for tests and to find the adapter that breaks capture. Randomness must live in the state (the
ensemble's per-row counter RNG) or come from torch's default generator (graph-safe).
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from gymnasium import spaces
from gymnasium.vector import AutoresetMode

from world_model_env import AdapterError, _check_info, _leading_dim, _scatter, _unpack, _STEP_KEYS


def _leaves(tree, where="state"):
    """(path, tensor) pairs of a pytree of tensors (dicts, tuples, lists)."""
    if isinstance(tree, Mapping):
        return [leaf for k in tree for leaf in _leaves(tree[k], f"{where}[{k!r}]")]
    if isinstance(tree, (tuple, list)):
        return [leaf for i, t in enumerate(tree) for leaf in _leaves(t, f"{where}[{i}]")]
    return [(where, tree)]


class GraphStep:
    """The graph-mode step of one `WorldModelVectorEnv` (see the module docstring). Made by `use_cuda_graph`."""

    def __init__(self, env, eager: bool = False):
        owner = f"{env._owner}.use_cuda_graph"
        if env.output != "torch":
            raise ValueError(f"{owner}: needs output='torch' (the graph's outputs are tensors), got {env.output!r}.")
        if env.autoreset_mode is not AutoresetMode.NEXT_STEP:
            raise ValueError(f"{owner}: needs autoreset_mode=NEXT_STEP (SAME_STEP reads the finished rows in the "
                             f"step itself), got {env.autoreset_mode}.")
        if not isinstance(env.single_action_space, (spaces.Discrete, spaces.Box)):
            raise ValueError(f"{owner}: supports Discrete and Box action spaces, got {env.single_action_space}.")
        cuda = env.device is not None and torch.device(env.device).type == "cuda"
        if not (eager or cuda):
            raise ValueError(f"{owner}: CUDA graphs need the env on a CUDA device, got device '{env.device}'. Pass "
                             "eager=True to run the graph-mode step without a graph (tests, debugging).")
        if env._state is not None:
            raise ValueError(f"{owner}: call it before reset(): the state buffers are the first reset's state.")
        self.env, self.eager, self.cuda = env, eager, cuda
        box = isinstance(env.single_action_space, spaces.Box)
        self._box_dtype = torch.from_numpy(np.empty(0, env.single_action_space.dtype)).dtype if box else None
        self._replay = None  # () -> the step's outputs, made at the first step
        self._pending = None  # (host verdict, its copy's event or None, step number) of the last step
        self._steps_taken = 0

    # -- the env's hooks ---------------------------------------------------------------------------------------
    def after_reset(self):
        """reset() made a new state: copy it into the graph's buffers (their addresses are the graph's)."""
        env = self.env
        self._pending, self._steps_taken = None, 0  # the last step's rows all start over anyway
        if self._replay is None:
            return
        new = _leaves(env._state)
        if [p for p, _ in new] != [p for p, _ in self._state_leaves]:
            raise AdapterError(f"{env._owner}: reset_fn returned a state whose structure differs from the first "
                               f"reset's ({[p for p, _ in new]} vs {[p for p, _ in self._state_leaves]}); a CUDA "
                               "graph reads fixed buffers.")
        for (where, dst), (_, src) in zip(self._state_leaves, new):
            self._check_leaf(where, src, dst)
            dst.copy_(src)
        env._state = self._state
        self._steps.zero_()
        env._steps = self._steps
        self._clear.zero_()
        self._reset_ok.fill_(True)

    def step(self, actions):
        env = self.env
        actions = env._convert(actions)
        if tuple(actions.shape) != env.action_space.shape:
            raise ValueError(f"{env._owner}.step: actions have shape {tuple(actions.shape)}, expected "
                             f"{env.action_space.shape} (num_envs={env.num_envs}, single action_space "
                             f"{env.single_action_space}). Pass one action per env.")
        if self._box_dtype is not None:  # Box actions in the bounds' dtype, as the eager env does
            actions = actions.to(self._box_dtype)
        if self._replay is None:
            self._build(actions)
        elif actions.dtype != self._actions.dtype:  # copy_ would cast silently (floats to indices, say)
            raise ValueError(f"{env._owner}.step: actions of dtype {actions.dtype}; this env's CUDA graph was "
                             f"captured for {self._actions.dtype} (its first step's). Pass one dtype throughout.")
        self._actions.copy_(actions)
        obs, reward, terminated, truncated, info, verdict = self._replay()
        rows = self._finished_rows()  # the previous step's verdict: the GPU runs this step meanwhile
        if self.cuda:
            host, event = self._host[self._steps_taken % 2], self._events[self._steps_taken % 2]
            host.copy_(verdict, non_blocking=True)
            event.record()
        else:
            host, event = verdict.clone(), None
        self._steps_taken += 1
        self._pending = (host, event, self._steps_taken)
        if len(rows):  # NEXT_STEP: last step's finished rows start over (their transition is already cleared)
            with torch.no_grad():
                r_state, r_obs, _ = env._call_reset(env._draw_seeds(rows), None)
                idx = env._index(rows)
                obs.index_copy_(0, idx, r_obs)
                _scatter(self._state, rows, r_state, "state", idx)
                if env._obs_float:  # checked with the next step's verdict
                    self._reset_ok.copy_(r_obs.sum(dtype=torch.float32).isfinite())
        return (obs.clone(), reward.clone(), terminated.clone(), truncated.clone(),
                {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in info.items()})

    # -- internals ----------------------------------------------------------------------------------------------
    def _check_leaf(self, where, src, dst):
        if not (isinstance(src, torch.Tensor) and src.shape == dst.shape and src.dtype == dst.dtype
                and src.device == dst.device):
            raise AdapterError(f"{self.env._owner}: {where} must stay a tensor of shape {tuple(dst.shape)}, dtype "
                               f"{dst.dtype} on {dst.device} for a CUDA graph; got {type(src).__name__}"
                               f"{'' if not isinstance(src, torch.Tensor) else (tuple(src.shape), src.dtype, src.device)}.")

    def _build(self, actions):
        env = self.env
        self._state_leaves = _leaves(env._state)
        dev = env._steps.device
        for where, leaf in self._state_leaves:
            if not isinstance(leaf, torch.Tensor) or leaf.device != dev:
                raise AdapterError(f"{env._owner}: a CUDA graph needs the model state as tensors on {env.device}; "
                                   f"reset_fn's {where} is {type(leaf).__name__}"
                                   f"{'' if not isinstance(leaf, torch.Tensor) else ' on ' + str(leaf.device)}.")
        self._state, self._steps = env._state, env._steps
        n = env.num_envs
        self._actions = actions.clone()
        self._clear = torch.zeros(n, dtype=torch.bool, device=dev)  # last step's done rows (NEXT_STEP)
        self._reset_ok = torch.ones((), dtype=torch.bool, device=dev)  # the reset rows' observations were finite
        space = env.single_action_space
        if isinstance(space, spaces.Discrete):
            if actions.dtype.is_floating_point or actions.dtype == torch.bool:
                raise ValueError(f"{env._owner}.step: Discrete actions must be integers, got {actions.dtype}.")
            self._bounds = (int(space.start), int(space.start + space.n - 1))
        else:
            self._bounds = (torch.as_tensor(space.low, device=dev), torch.as_tensor(space.high, device=dev))
        if self.cuda:  # two, so that a step's copy never lands in the one the host is reading
            self._host = [torch.zeros(n + 2, dtype=torch.bool).pin_memory() for _ in range(2)]
            self._events = [torch.cuda.Event() for _ in range(2)]
        if self.eager:
            self._body(write=False)  # the adapters' outputs checked once, as the graph's warm-up does
            self._replay = lambda: self._body(write=True)
            return
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm-up off the capture (cuBLAS handles, lazy modules), state untouched
            for _ in range(2):
                self._body(write=False)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                outputs = self._body(write=True)
        except Exception as err:  # a host read or a host->device copy in an adapter, most often
            first = err
            while first.__context__ is not None:  # the capture's own end fails too: name what failed first
                first = first.__context__
            raise AdapterError(f"{env._owner}: capturing the step in a CUDA graph failed ({type(first).__name__}: "
                               f"{(str(first).splitlines() or [''])[0]}). The adapters must be tensor "
                               "operations on the device without host reads (.item(), bool(tensor), .cpu()); "
                               "use_cuda_graph(eager=True) runs the same step without a graph to find the one "
                               "that breaks, or step without use_cuda_graph() (the scripts: --no-cuda-graph).") from err
        self._graph = graph

        def replay():
            graph.replay()
            return outputs

        self._replay = replay

    def _body(self, write: bool):
        """One step on the buffers: returns (obs, reward, terminated, truncated, info, verdict); write=True also
        moves the buffers on (state, step counters, the done mask). Shape and dtype checks run in Python, i.e. at
        the warm-up and the capture only."""
        env = self.env
        a = self._actions
        if type(self._bounds[0]) is int:  # Discrete
            clamped = a.clamp(*self._bounds)
            ok = (clamped == a).all()
        else:
            clamped, ok = a, (a.clamp(*self._bounds) == a).all()  # NaN compares unequal: not ok
        with torch.no_grad():
            model_a = clamped if env.action_transform_fn is None else env.action_transform_fn(env.model, clamped)
            out = env.transition_fn(env.model, self._state, model_a)
            state, obs, reward, terminated = _unpack(env._owner, "transition_fn", out, _STEP_KEYS)
            if _leading_dim(state) != env.num_envs:
                raise AdapterError(f"{env._owner}: transition_fn returned a state with leading dimension "
                                   f"{_leading_dim(state)}, expected {env.num_envs}.")
            new = _leaves(state)
            if [p for p, _ in new] != [p for p, _ in self._state_leaves]:
                raise AdapterError(f"{env._owner}: transition_fn returned a state of structure {[p for p, _ in new]}, "
                                   f"reset_fn {[p for p, _ in self._state_leaves]}; a CUDA graph needs one structure.")
            for (where, dst), (_, src) in zip(self._state_leaves, new):
                self._check_leaf(where, src, dst)
            clear = self._clear
            obs = env._as_obs(obs, "transition_fn", env.num_envs)
            reward = env._as_vector(reward, "reward", clear)
            terminated = env._as_vector(terminated, "terminated", clear)
            steps = (self._steps + 1).masked_fill_(clear, 0)
            truncated = env._as_vector(out["truncated"], "truncated", clear) if "truncated" in out else None
            if env.max_episode_steps is not None:
                limit = steps >= env.max_episode_steps
                truncated = limit if truncated is None else truncated | limit
            elif truncated is None:
                truncated = torch.zeros_like(terminated)
            info = _check_info(env._owner, "transition_fn", out.get("info"))
            done = terminated | truncated
            total = reward.sum()
            if env._obs_float:
                total = total + obs.sum(dtype=torch.float32)
            verdict = torch.cat(((total.isfinite() & self._reset_ok).reshape(1), ok.reshape(1), done))
            if write:
                for (_, dst), (_, src) in zip(self._state_leaves, new):
                    dst.copy_(src)
                self._steps.copy_(steps)
                clear.copy_(done)
                self._reset_ok.fill_(True)
        return obs, reward, terminated, truncated, info, verdict

    def _finished_rows(self) -> np.ndarray:
        """The previous step's done rows (host indices), after raising what its verdict found."""
        if self._pending is None:
            return np.zeros(0, dtype=np.int64)
        host, event, step = self._pending
        if event is not None:
            event.synchronize()
        flags = host.numpy()
        env = self.env
        if not flags[1]:
            env._state = None
            raise ValueError(f"{env._owner}.step: some actions of step {step} after the last reset were outside "
                             f"action_space {env.single_action_space} (a CUDA graph step checks them one step late; "
                             "Discrete indices were clamped for the model). Pass actions from env.action_space; clip "
                             "continuous actions to the bounds. Call reset() before stepping again.")
        if not flags[0]:
            env._state = None
            raise AdapterError(f"{env._owner}: transition_fn or reset_fn returned a non-finite observation or reward "
                               f"(NaN or Inf) in step {step} after the last reset (a CUDA graph step checks one step "
                               "late; the plain env, without use_cuda_graph(), names the rows). The world model "
                               "diverged; clip its predictions or shorten max_episode_steps.")
        return np.flatnonzero(flags[2:])
