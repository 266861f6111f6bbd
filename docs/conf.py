"""Sphinx configuration of the trilemma_moe documentation site.

Build it as CI does (warnings are errors, so a broken link or reference fails the build):

    python -m sphinx -W --keep-going -n -b html docs docs/_build/html
"""
from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "_ext"))          # the site's own extensions
sys.path.insert(0, os.path.dirname(HERE))               # the package, for autodoc

project = "trilemma_moe"
author = "the trilemma_moe developers"
copyright = "2026, the trilemma_moe developers"

extensions = [
    "myst_parser",             # pages are Markdown (CommonMark + MyST directives)
    "sphinx.ext.autodoc",      # API reference from docstrings
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "config_reference",        # docs/_ext: the knob table from TrilemmaMoEConfig
    "trainer_reference",       # docs/_ext: the trainer's flags from its argparse parser
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "results/**", "figures/**", "README.md"]
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 4       # [text](page.md#a-heading) links are checked
suppress_warnings: list[str] = []

autodoc_typehints = "description"
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": False}
# Heavy optional imports the API pages do not need to execute.
autodoc_mock_imports: list[str] = []

# --- nitpicky (-n) exceptions: types of OTHER libraries only --------------------------------------
# The build has no network, so no intersphinx: references that type hints and docstrings make to
# torch, DeepSpeed, Megatron-core, transformers and the standard library / typing cannot resolve.
# Everything of trilemma_moe's own must resolve (document it, or write it as a ``literal``).
nitpick_ignore_regex = [
    ("py:.*", r"(torch|deepspeed|megatron|transformers|numpy|yaml)(\..+)?"),
    ("py:.*", r"(nn|optim|dist)\..+"),           # torch.nn, torch.optim, torch.distributed as the code imports them
    ("py:.*", r"(os|collections|typing|types|pathlib|enum|argparse|contextlib)\..+"),   # the standard library
]

html_theme = "furo"
html_title = "trilemma_moe"
html_static_path: list[str] = []
html_copy_source = False
