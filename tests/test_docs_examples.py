"""README's "Using the layer with Hugging Face models" examples run as written: each Python block
of that section in a fresh process, with the environment a one-rank launcher gives."""
import os
import pathlib
import re
import subprocess
import sys

import pytest

from test_peer_matrix import free_port

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

ROOT = pathlib.Path(__file__).resolve().parents[1]
SECTION = "## Using the layer with Hugging Face models"


def readme_blocks():
    text = (ROOT / "README.md").read_text()
    start = text.index(SECTION)
    section = text[start:text.index("\n## ", start + len(SECTION))]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_the_section_has_its_two_examples():
    blocks = readme_blocks()
    assert len(blocks) == 2 and "attach_trainer(trainer)" in blocks[0] and "initialize(model, ds_config)" in blocks[1]


@pytest.mark.parametrize("index", [0, 1], ids=["trainer", "initialize"])
def test_readme_example_runs(index, tmp_path):
    script = tmp_path / "example.py"
    script.write_text(readme_blocks()[index])
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT), RANK="0",
               WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    if index == 0:
        assert proc.stdout.count("expert parameters") == 2 and (tmp_path / "converted" / "config.json").exists()
    else:
        assert re.search(r"^loss \d+\.\d+$", proc.stdout, re.M), proc.stdout[-2000:]
