"""The parts of the GPU check (bench/gpu.sh) that need no GPU, so they cannot rot where no
session has one: the script parses and its --check imports what it runs, and its benchmark
runs end to end on a small random Llama-shaped model on CPU (the full 0.5B shape on CUDA is
bench/gpu.sh's job)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))


def test_gpu_script_parses_and_its_check_runs(tmp_path):
    assert subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu.sh")]).returncode == 0
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--check"], capture_output=True, text=True,
                       env={"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "OUT": str(tmp_path)})
    assert r.returncode == 0 and "imports ok" in r.stdout, r.stderr[-2000:]
    assert "torch" in (tmp_path / "versions.txt").read_text()
    wanted = {line.strip() for line in (ROOT / "bench" / "gpu-requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    assert {"fastapi", "math-verify", "langchain-core", "openai", "matplotlib", "pytest"} <= wanted


def test_the_benchmark_runs_a_whole_score_run_on_a_random_llama():
    import bench_gpu

    result = bench_gpu.run(small=True, device="cpu")
    assert result["shape"]["vocab_size"] == 151936 and result["parameters"] > 19_000_000
    assert [r["batch_tasks"] for r in result["runs"]] == [4, 8]
    assert all(r["peak_gib"] > 0.3 and r["time_train"] > 0 and r["time_generate"] > 0 for r in result["runs"])
