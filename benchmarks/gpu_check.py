"""The GPU check (`make gpu-check`): on a machine with CUDA, the device tests with CUDA
selected, a short training run on the GPU in float32 and in bfloat16, 2-process NCCL training when
two GPUs are present, and the bench, with every number in one JSON file.

    python benchmarks/gpu_check.py --out runs/gpu-check

Without CUDA it says so and exits with status 2 (nothing to check).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch


def run(cmd: list[str], log: Path, env: dict | None = None) -> dict:
    start = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT,
                               env={**os.environ, **(env or {})})
    return {"command": " ".join(cmd), "exit_status": code,
            "seconds": round(time.perf_counter() - start, 1), "log": log.name}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/gpu-check")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu-check: CUDA is not available on this machine; nothing to check",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    py, br = sys.executable, [sys.executable, "-m", "bayes_router"]
    result = {"torch": torch.__version__, "cuda": torch.version.cuda,
              "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
    result["tests"] = run([py, "-m", "pytest", "-q", "tests/test_devices.py",
                           "tests/inference/test_distributed.py",
                           "tests/inference/test_precision_training.py", "tests/models"],
                          out / "tests.log")
    train = ["train", "--corpus", "stdlib", "--steps", str(args.steps), "--eval-every",
             str(args.steps), "--checkpoint-every", str(args.steps)]
    result["train_cuda"] = run([*br, *train, "--device", "cuda", "--out", str(out / "cuda"),
                                "--force"], out / "train_cuda.log")
    result["train_cuda_bf16"] = run([*br, *train, "--device", "cuda", "--dtype", "bfloat16",
                                     "--out", str(out / "cuda_bf16"), "--force"],
                                    out / "train_cuda_bf16.log")
    result["train_cpu"] = run([*br, *train, "--device", "cpu", "--out", str(out / "cpu"),
                               "--force"], out / "train_cpu.log")
    for name in ("cuda", "cuda_bf16", "cpu"):
        metrics = out / name / "metrics.json"
        if metrics.exists():
            m = json.loads(metrics.read_text())
            result[f"train_{name}"].update(train_seconds=m["train_seconds"],
                                           val_nll=m["soft"]["val_nll"])
    if torch.cuda.device_count() >= 2:
        result["train_ddp_2gpu"] = run(
            [py, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "bayes_router",
             *train, "--device", "cuda", "--out", str(out / "ddp"), "--force"],
            out / "train_ddp.log")
    result["bench"] = run([*br, "bench", "--out", str(out / "bench"), "--force"],
                          out / "bench.log")
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if all(v.get("exit_status", 0) == 0 for v in result.values()
                    if isinstance(v, dict)) else 1


if __name__ == "__main__":
    sys.exit(main())
