"""The package layout holds, measured from the code's own imports: no import cycle in
`pipeline/` or `omnizip/`, no import up the layers, no module over the size limit, few modules
directly in `pipeline/`; the scheduler imports without Ray, torch or av."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import check_layout  # noqa: E402


def test_no_cycle_no_upward_import_no_oversized_module() -> None:
    r = check_layout.report()
    assert r["cycles"] == [], r["cycles"]
    assert r["upward_imports"] == [], r["upward_imports"]
    assert r["over_limit"] == {}, r["over_limit"]
    assert r["unplaced_modules"] == [], r["unplaced_modules"]
    assert len(r["top_level_modules"]) <= check_layout.MAX_TOP_MODULES, r["top_level_modules"]


def test_the_checker_sees_a_cycle(tmp_path: Path) -> None:
    """The cycle count is not vacuous: two modules importing each other (one inside a function,
    as the old runtime <-> actors cycle did) are found; a TYPE_CHECKING import is not."""
    pkg = tmp_path / "demo"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from demo.b import x\n")
    (pkg / "b.py").write_text("x = 1\n\ndef f():\n    from demo.a import x\n    return x\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from demo.a import x\n")
    (pkg / "d.py").write_text("from demo.c import TYPE_CHECKING\n")
    files = sorted(pkg.glob("*.py"))
    old_root = check_layout.ROOT
    check_layout.ROOT = tmp_path
    try:
        modules = {check_layout.module_name(p) for p in files}
        graph = {check_layout.module_name(p): check_layout.imports_of(p, modules) for p in files}
    finally:
        check_layout.ROOT = old_root
    assert check_layout.cycles(graph) == [["demo.a", "demo.b"]]
    assert "demo.a" not in graph["demo.c"]


def test_the_scheduler_and_the_records_import_without_ray_torch_or_av() -> None:
    code = ("import sys; import pipeline.core.queues, pipeline.core.pool, pipeline.core.records, "
            "pipeline.core.messages, pipeline.core.stats; "
            "print(sorted(m for m in ('ray', 'torch', 'av') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
