"""Writing files that are never half-written: atomic replacement, JSON that stays standard, torch checkpoints.

A leaf module (numpy and the standard library; torch only when a value is a tensor or a checkpoint is written), so
that every other module of the collection can import it without pulling in anything else.
"""
import contextlib
import json
import math
import os
import sys
import tempfile

import numpy as np


def json_safe(obj):
    """Converts numpy/torch scalars and arrays, and non-finite floats (-> None), so that json stays standard."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer, int)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(float(obj)) else None
    return obj


@contextlib.contextmanager
def atomic_path(path, suffix):
    """Yields a temporary file name in `path`'s directory; when the block ends without an error the file replaces
    `path` (os.replace: readers never see half a file) with the permissions a plain open() would give (mkstemp
    makes files 0600); on an error it is removed. Every file the collection writes goes through here."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=suffix, dir=directory)
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json_atomic(path, obj):
    """Writes `obj` as JSON to `path` atomically (see `atomic_path`)."""
    with atomic_path(path, ".json") as tmp, open(tmp, "w") as f:
        json.dump(json_safe(obj), f, indent=2, allow_nan=False)


def save_torch_atomic(path, payload):
    """torch.save, atomically (see `atomic_path`): a crash never leaves half a checkpoint. Returns the path."""
    import torch

    with atomic_path(path, ".pt") as tmp:
        torch.save(payload, tmp)
    return os.fspath(path)
