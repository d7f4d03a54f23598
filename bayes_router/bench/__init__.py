"""The speed benchmark behind ``bayes-router bench``: the measurements (:mod:`.harness`), the
baselines they are compared with (:mod:`.baselines`), the targets (:mod:`.targets`), what each
number means (:mod:`.conventions`) and the table, report and figure (:mod:`.report`)."""

from bayes_router.bench.conventions import CONVENTIONS
from bayes_router.bench.harness import (
    EXPERTS,
    BenchConfig,
    matmul_throughput,
    median_time,
    median_times,
    one_hot_mix,
    run_benchmark,
)
from bayes_router.bench.report import bench_figure, bench_report, format_table
from bayes_router.bench.targets import check_targets

__all__ = ["CONVENTIONS", "EXPERTS", "BenchConfig", "bench_figure", "bench_report", "check_targets",
           "format_table", "matmul_throughput", "median_time", "median_times", "one_hot_mix",
           "run_benchmark"]
