"""experiments/gpu_check.py --smoke: every section runs (or says why not) on CPU at tiny sizes."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = {"pytest", "edit", "search", "sdpa", "compile", "nccl", "memory"}


def test_gpu_check_smoke(tmp_path):
    out = tmp_path / "smoke.json"
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "gpu_check.py"), "--smoke", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| section | setting | figures | status |" in proc.stdout
    rows = json.loads(out.read_text())
    assert {r["section"] for r in rows} == SECTIONS
    assert all(r["status"] for r in rows)
    assert not [r for r in rows if r["status"].startswith("failed")]

    def ok(section, prefix=""):
        picked = [r for r in rows if r["section"] == section and r["setting"].startswith(prefix)]
        assert picked, (section, prefix)
        for r in picked:
            assert r["status"] == "ok", r
            assert r["figures"] and all(v > 0 for k, v in r["figures"].items() if k != "max_abs_diff"), r
        return picked

    assert len(ok("edit")) == 2  # SD 2.1-base and SDXL configs
    assert all(r["figures"]["exact"] == 1.0 for r in ok("search", "torch"))
    assert ok("sdpa", "math")[0]["figures"]["max_abs_diff"] == 0
    ok("compile", "off")
    assert len(ok("memory")) == 6  # 3 lengths x (all, anchors)
    cuda_only = [r for r in rows if r["section"] in ("pytest", "nccl")
                 or r["setting"].startswith(("faiss-gpu", "flash", "efficient", "on:"))]
    assert cuda_only and all(r["status"].startswith("skipped: ") and len(r["status"]) > 10 for r in cuda_only)


def test_gpu_check_without_cuda_says_use_smoke():
    import torch

    if torch.cuda.is_available():
        return
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "gpu_check.py")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--smoke" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
