"""The JSON files of the experiments: strict JSON written atomically and read back with a clear
error, and the library versions every result records.
"""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path

import numpy as np
import pyro
import torch

import bayes_router


def versions() -> dict:
    """Versions of the libraries a result depends on."""
    return {"python": platform.python_version(), "torch": torch.__version__,
            "pyro": pyro.__version__, "numpy": np.__version__,
            "bayes_router": getattr(bayes_router, "__version__", "unknown"),
            "platform": platform.platform(), "threads": torch.get_num_threads()}


def json_safe(value):
    """``value`` with arrays as lists, paths as strings and NaN or infinite floats as ``None``
    (strict JSON)."""
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    if isinstance(value, np.ndarray | torch.Tensor):
        return json_safe(value.tolist())
    if isinstance(value, np.generic):
        return json_safe(value.item())
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: Path, data) -> None:
    """Write strict JSON through a temporary file and a rename: a reader never sees half a
    file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n")
    tmp.replace(path)


def read_json(path: Path, kind: type = dict):
    """A JSON file of ours, parsed, with a clear error naming the file if it is not valid JSON
    or not a ``kind`` at the top level."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error.msg} at line {error.lineno}, "
                         f"column {error.colno}); it may be truncated: delete it or choose "
                         f"another folder") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text (UTF-8 JSON) file") from None
    if not isinstance(data, kind):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, expected a "
                         f"{kind.__name__}")
    return data
