"""A script that starts a multi-instance layout without `if __name__ == "__main__":` gets an error
that says so, instead of "instance P0 exited during start-up (code 1)".

Each script runs as a real subprocess of this interpreter, as a user would run it; spawned
instance processes re-run it as their main module.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

GUARD = 'if __name__ == "__main__":'
TIMEOUT_S = 120  # a bound against a hang, far above the few seconds it takes

UNGUARDED = """
from epd import LLM, SamplingParams

llm = LLM({model!r}, layout="1E+1P+1D")
print("generated:", llm.generate(["hello"], SamplingParams(max_tokens=2), use_tqdm=False))
"""

# Guarded, but importing it fails in a spawned child (which runs it as __mp_main__): the instance
# dies before any epd code runs there.
FAILS_IN_CHILDREN = """
if __name__ != "__main__":
    raise ImportError("this module refuses to be imported by a child process")

if __name__ == "__main__":
    from epd import LLM

    LLM({model!r}, layout="1E+1P+1D")
"""


def run_script(tmp_path: Path, source: str, model: Path) -> subprocess.CompletedProcess:
    script = tmp_path / "script.py"
    script.write_text(source.format(model=str(model)))
    return subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT_S
    )


def test_unguarded_script_is_told_to_guard_its_entry_point(tmp_path, checkpoints):
    result = run_script(tmp_path, UNGUARDED, checkpoints["qwen2_5_vl"])
    assert result.returncode != 0
    assert "generated:" not in result.stdout
    err = result.stderr
    assert "RuntimeError: instance " in err and "failed to start" in err, err[-3000:]
    assert "re-ran your main module" in err, err[-3000:]
    assert GUARD in err, err[-3000:]
    # Where: the script's unguarded line, as the instance process ran into it.
    assert f'File "{tmp_path / "script.py"}", line 4' in err, err[-3000:]


def test_main_module_failing_in_children_gets_a_pointer(tmp_path, checkpoints):
    result = run_script(tmp_path, FAILS_IN_CHILDREN, checkpoints["qwen2_5_vl"])
    assert result.returncode != 0
    err = result.stderr
    assert "exited during start-up (code 1)" in err, err[-3000:]
    assert f"first import your main module ({tmp_path / 'script.py'})" in err, err[-3000:]
    assert GUARD in err, err[-3000:]
    assert "this module refuses to be imported by a child process" in err  # the child's own traceback
